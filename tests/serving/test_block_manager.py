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


# --- prefix caching ----------------------------------------------------------------------------


def _prompt(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=4))


def _computed(bm: BlockManager, seq: Sequence) -> None:
    """What a step does for a whole prompt: blocks for it, all of it computed, full blocks cached."""
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed(seq)


SHARED = list(range(100, 108))  # two blocks of 4


def test_a_shared_prefix_is_matched_and_refcounted() -> None:
    bm = BlockManager(num_blocks=10, block_size=4, prefix_caching=True)
    a = _prompt("a", [*SHARED, 1, 2, 3])
    _computed(bm, a)
    b = _prompt("b", [*SHARED, 9])
    assert bm.match_prefix(b) == 8 and b.num_computed_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    bm.allocate(b, b.num_tokens)
    assert b.block_table[2] not in a.block_table  # the uncached tail is b's own
    assert bm.num_used_blocks == 4
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1] and bm.num_used_blocks == 3
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 10
    c = _prompt("c", [*SHARED, 5, 6])  # cached blocks outlive their holders until evicted
    assert bm.match_prefix(c) == 8 and bm.num_used_blocks == 2


def test_the_last_token_is_always_computed() -> None:
    bm = BlockManager(num_blocks=10, block_size=4, prefix_caching=True)
    _computed(bm, _prompt("a", SHARED))
    same = _prompt("b", list(SHARED))
    assert bm.match_prefix(same) == 4  # not 8: the last block is recomputed in a block of its own
    assert same.num_uncomputed_tokens == 4


def test_a_request_for_prompt_logprobs_computes_its_whole_prompt() -> None:
    bm = BlockManager(num_blocks=10, block_size=4, prefix_caching=True)
    _computed(bm, _prompt("a", [*SHARED, 1]))
    echo = Sequence("b", [*SHARED, 9], SamplingParams(max_tokens=4, prompt_logprobs=1))
    assert bm.match_prefix(echo) == 0 and echo.num_uncomputed_tokens == 9  # every position gets logits


def test_matching_stops_at_the_first_different_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=4, prefix_caching=True)
    _computed(bm, _prompt("a", [*SHARED, 1, 1, 1, 1, 7]))
    assert bm.match_prefix(_prompt("b", [*SHARED[:4], 0, 0, 0, 0, 1, 1, 1, 1, 7])) == 4
    assert bm.match_prefix(_prompt("c", [0, *SHARED[1:], 1])) == 0  # a block's key chains its prefix


def test_cached_blocks_are_evicted_least_recently_released_first() -> None:
    bm = BlockManager(num_blocks=5, block_size=4, prefix_caching=True)
    old, new = _prompt("old", [1] * 8 + [2]), _prompt("new", [3] * 4 + [4])
    _computed(bm, old)  # blocks: 2 cached + 1 partial
    _computed(bm, new)  # 1 cached + 1 partial
    bm.free(old)
    bm.free(new)
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 0
    fresh = _prompt("fresh", [5] * 9)
    bm.allocate(fresh, 9)  # the two uncached blocks, then evicts old's second block (released first)
    assert bm.num_free_blocks == 2
    assert bm.match_prefix(_prompt("new2", [3] * 4 + [4])) == 4
    assert bm.match_prefix(_prompt("old2", [1] * 8 + [2])) == 4  # its second block is gone


def test_an_equal_block_computed_twice_is_cached_once_and_both_are_freed() -> None:
    bm = BlockManager(num_blocks=6, block_size=4, prefix_caching=True)
    a, b = _prompt("a", [*SHARED, 1]), _prompt("b", [*SHARED, 2])
    _computed(bm, a)  # admitted in the same step: neither found the other's blocks
    shared = a.block_table[:2]
    bm.allocate(b, b.num_tokens)
    b.num_computed_tokens = b.num_tokens
    bm.cache_computed(b)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6
    c = _prompt("c", [*SHARED, 3])
    assert bm.match_prefix(c) == 8 and c.block_table == shared


def test_without_prefix_caching_nothing_is_matched() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    _computed(bm, _prompt("a", [*SHARED, 1]))
    assert bm.match_prefix(_prompt("b", [*SHARED, 1])) == 0
