"""BlockManager: block accounting without a model."""

from __future__ import annotations

import pytest

from serving.engine.block_manager import BlockManager, kv_bytes_per_token, num_blocks_for_budget
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence


def _seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams(max_tokens=4))


def test_allocate_covers_tokens_and_grows_one_block_at_a_time() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = _seq("a", 5)
    bm.allocate(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 8
    bm.allocate(seq, 8)  # still fits in two blocks
    assert len(seq.block_table) == 2
    bm.allocate(seq, 9)
    assert len(seq.block_table) == 3 and bm.num_used_blocks == 3
    assert len(set(seq.block_table)) == 3


def test_free_returns_every_block_and_blocks_are_not_shared() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = _seq("a", 8), _seq("b", 12)
    bm.allocate(a, 8)
    bm.allocate(b, 12)
    assert not set(a.block_table) & set(b.block_table)
    assert not bm.can_allocate(b, 13)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 2
    assert bm.can_allocate(b, 13)
    bm.free(b)
    assert bm.num_free_blocks == 5


def test_allocate_past_the_budget_raises() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(RuntimeError, match="out of blocks"):
        bm.allocate(_seq("a", 9), 9)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)


def test_budget_arithmetic_for_the_default_57m_model() -> None:
    # 2 x 8 layers x 2 KV heads x 64 head dim x 4 bytes (fp32) = 8 KiB per token.
    per_token = kv_bytes_per_token(num_layers=8, num_kv_heads=2, head_dim=64, dtype_bytes=4)
    assert per_token == 8192
    assert num_blocks_for_budget(1.0, block_size=16, bytes_per_token=per_token) == 8192
    assert num_blocks_for_budget(0.5, block_size=32, bytes_per_token=per_token) == 2048
