"""Paged KV-cache bookkeeping (vLLM's PagedAttention idea): fixed-size blocks handed out and taken back.

No torch here: the block ids index the runner's cache tensors, this file only decides who owns which.
"""

from __future__ import annotations

from collections import deque

from serving.engine.prefix_cache import PrefixCache, block_keys
from serving.engine.sequence import Sequence

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def num_blocks_for_budget(memory_gb: float, block_size: int, bytes_per_token: int) -> int:
    """How many blocks of block_size tokens fit in memory_gb (GiB)."""
    return int(memory_gb * 1024**3) // (block_size * bytes_per_token)


class BlockManager:
    """Free list of block ids; a sequence holds exactly ceil(tokens / block_size) blocks for its tokens.

    With prefix_caching, full computed blocks are also kept by content (prefix_cache.py): a block is held
    by every sequence whose prefix it stores (a refcount), and when the last one lets go it stays cached
    and evictable, counted as free, until a fresh block is wanted and nothing truly free is left.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.prefix_cache = PrefixCache() if prefix_caching else None

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now: never used or released, plus cached ones nobody holds."""
        evictable = self.prefix_cache.num_evictable if self.prefix_cache else 0
        return len(self._free) + evictable

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def ref_count(self, block: int) -> int:
        """How many sequences hold `block` (0: free or cached and evictable)."""
        return self._refs[block]

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks seq needs so that its first num_tokens tokens have a slot."""
        want = -(-num_tokens // self.block_size)
        return max(0, want - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to cover num_tokens tokens; the caller checked can_allocate."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"KV cache out of blocks: need {need}, {self.num_free_blocks} free")
        for _ in range(need):
            block = self._free.popleft() if self._free else self._cache().evict()
            self._refs[block] = 1
            seq.block_table.append(block)

    def match_prefix(self, seq: Sequence) -> int:
        """Before seq is admitted: share the cached blocks of its longest cached prefix and count those
        tokens as computed; returns how many. One token is always left to compute (its logits give the
        next token), and it lands in a block of seq's own, so shared blocks are never written.
        A request asking for prompt logprobs computes its whole prompt (as vLLM's does): cached positions
        have no logits to report."""
        cache = self.prefix_cache
        if (
            cache is None
            or seq.block_table
            or seq.num_computed_tokens
            or seq.params.prompt_logprobs is not None
        ):
            return 0
        keys = block_keys(seq.token_ids, self.block_size, seq.block_keys)
        blocks = cache.lookup(keys[: (seq.num_tokens - 1) // self.block_size])
        for block in blocks:
            if self._refs[block] == 0:
                cache.claim(block)
            self._refs[block] += 1
        seq.block_table.extend(blocks)
        seq.num_cached_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        return seq.num_computed_tokens

    def cache_computed(self, seq: Sequence) -> None:
        """After a step: put seq's newly full, computed blocks into the prefix cache."""
        cache = self.prefix_cache
        full = seq.num_computed_tokens // self.block_size
        if cache is None or full <= seq.num_cached_blocks:
            return
        keys = block_keys(seq.token_ids, self.block_size, seq.block_keys)
        for i in range(seq.num_cached_blocks, full):
            cache.insert(keys[i], seq.block_table[i])
        seq.num_cached_blocks = full

    def free(self, seq: Sequence) -> None:
        """Let go of all of seq's blocks (finished, aborted, preempted, or an admission undone).

        Last block first: the LRU then evicts a sequence's tail before the prefix others may share.
        """
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0 and not (self.prefix_cache and self.prefix_cache.release(block)):
                self._free.append(block)
        seq.block_table.clear()
        seq.num_cached_blocks = 0

    def _cache(self) -> PrefixCache:
        if self.prefix_cache is None:  # pragma: no cover - num_free_blocks counts evictable blocks only
            raise RuntimeError("no free block and no prefix cache to evict from")
        return self.prefix_cache
