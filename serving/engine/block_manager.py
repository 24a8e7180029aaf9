"""Paged KV-cache bookkeeping (vLLM's PagedAttention idea): fixed-size blocks handed out and taken back.

No torch here: the block ids index the runner's cache tensors, this file only decides who owns which.
"""

from __future__ import annotations

from collections import deque

from serving.engine.sequence import Sequence

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def num_blocks_for_budget(memory_gb: float, block_size: int, bytes_per_token: int) -> int:
    """How many blocks of block_size tokens fit in memory_gb (GiB)."""
    return int(memory_gb * 1024**3) // (block_size * bytes_per_token)


class BlockManager:
    """Free list of block ids; a sequence holds exactly ceil(tokens / block_size) blocks for its tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks seq needs so that its first num_tokens tokens have a slot."""
        want = -(-num_tokens // self.block_size)
        return max(0, want - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to cover num_tokens tokens; the caller checked can_allocate."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: need {need}, {len(self._free)} free")
        for _ in range(need):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks (finished, aborted or preempted)."""
        self._free.extend(seq.block_table)
        seq.block_table.clear()
