"""Automatic prefix caching (vLLM's idea): full KV blocks found again by the content they hold.

A full block's key is a digest of its tokens chained with the key of the block before it, so equal keys
mean an equal token prefix up to and including that block (the position is implied by the chain). Chat
traffic sends one system prompt in every request: its blocks are computed once and then shared, read-only,
by every request that starts with it.

No torch here. The cache only maps keys to block ids and keeps the LRU order of cached blocks nobody holds
(refcount 0): those still count as free, and are evicted, oldest first, when a fresh block is wanted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq

BlockKey = bytes
"""blake2b digest of (previous block's key, this block's token ids): 128 bits, no practical collisions."""


def block_keys(token_ids: Seq[int], block_size: int, known: list[BlockKey]) -> list[BlockKey]:
    """Keys of every full block of token_ids; `known` (keys of a prefix already hashed) is extended."""
    keys = known
    for i in range(len(keys), len(token_ids) // block_size):
        parent = keys[i - 1] if i else b""
        tokens = array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes()
        keys.append(hashlib.blake2b(parent + tokens, digest_size=16).digest())
    return keys


class PrefixCache:
    """Key -> block id for computed full blocks, and the LRU of those no sequence holds (evictable)."""

    def __init__(self) -> None:
        self._blocks: dict[BlockKey, int] = {}
        self._keys: dict[int, BlockKey] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def lookup(self, keys: Seq[BlockKey]) -> list[int]:
        """Block ids of the longest cached run of keys from the first one."""
        found: list[int] = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def claim(self, block: int) -> None:
        """A cached block gets a holder again: no longer evictable."""
        self._evictable.pop(block, None)

    def insert(self, key: BlockKey, block: int) -> bool:
        """Cache a just-computed full block; False when an equal block is cached already (it stays)."""
        if key in self._blocks or block in self._keys:
            return False
        self._blocks[key] = block
        self._keys[block] = key
        return True

    def release(self, block: int) -> bool:
        """The last holder let go: a cached block becomes evictable (True); an uncached one is not ours."""
        if block not in self._keys:
            return False
        self._evictable[block] = None
        return True

    def evict(self) -> int:
        """Forget the least recently released cached block and hand its id out for reuse."""
        block, _ = self._evictable.popitem(last=False)
        del self._blocks[self._keys.pop(block)]
        return block
