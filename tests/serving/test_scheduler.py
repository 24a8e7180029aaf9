"""Scheduler policies and queue orders with a fake block budget and no model (tokens are made up)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from serving.config import SchedulerConfig
from serving.engine.block_manager import BlockManager
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerOutput
from serving.engine.sequence import Sequence

TOKEN = 7


class Clock:
    """Scheduler time under test control."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(
    *,
    num_blocks: int = 256,
    block_size: int = 4,
    max_model_len: int = 256,
    eos: tuple[int, ...] = (),
    clock: Clock | None = None,
    prefix_caching: bool = False,
    **config: Any,
) -> Scheduler:
    cfg = SchedulerConfig(**{"max_num_batched_tokens": 256, "max_num_seqs": 8, **config})
    return Scheduler(
        cfg,
        BlockManager(num_blocks, block_size, prefix_caching=prefix_caching),
        max_model_len=max_model_len,
        eos_token_ids=eos,
        clock=clock or Clock(),
    )


_ids = itertools.count()


def add(
    s: Scheduler, rid: str, prompt_len: int, max_tokens: int = 3, priority: int = 0, t: float = 0.0, **p: Any
) -> Sequence:
    seq = Sequence(
        rid,
        [1] * prompt_len,
        SamplingParams(max_tokens=max_tokens, **p),
        priority=priority,
        arrival_time=t,
        seq_id=next(_ids),
    )
    s.add(seq)
    return seq


def step(s: Scheduler, token: int = TOKEN) -> SchedulerOutput:
    out = s.schedule()
    s.postprocess(out, [token] * out.num_sampled)
    return out


def names(out: SchedulerOutput) -> list[str]:
    return [x.seq.request_id for x in out.scheduled]


def run_all(s: Scheduler, limit: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while s.has_unfinished():
        outs.append(step(s))
        assert len(outs) < limit, "scheduler made no progress"
    assert s.block_manager.num_used_blocks == 0
    return outs


@pytest.mark.parametrize(
    ("order", "expected"),
    [("fcfs", ["a", "b", "c"]), ("priority", ["b", "c", "a"]), ("sjf", ["c", "b", "a"])],
)
def test_queue_order_decides_who_runs_first(order: str, expected: list[str]) -> None:
    s = make(policy="request", queue_order=order)
    add(s, "a", 10, priority=2, t=0.0)
    add(s, "b", 6, priority=1, t=1.0)
    add(s, "c", 3, priority=1, t=2.0)
    outs = run_all(s)
    assert all(len(o.scheduled) == 1 for o in outs), "request policy runs one request at a time"
    first_seen = list(dict.fromkeys(n for o in outs for n in names(o)))
    assert first_seen == expected


def test_continuous_admits_as_soon_as_a_slot_frees() -> None:
    s = make(policy="continuous", max_num_seqs=2)
    add(s, "a", 4, max_tokens=2)
    add(s, "b", 4, max_tokens=5)
    add(s, "c", 4, max_tokens=2)
    assert names(step(s)) == ["a", "b"]  # both prefill, one token each
    assert names(step(s)) == ["a", "b"]  # a finishes with its second token
    third = step(s)
    assert names(third) == ["b", "c"] and [x.num_tokens for x in third.scheduled] == [1, 4]
    run_all(s)


def test_static_batch_runs_to_completion_before_later_arrivals() -> None:
    clock = Clock()
    s = make(policy="static", max_num_seqs=2, batch_wait_ms=0, clock=clock)
    add(s, "a", 4, max_tokens=1)
    add(s, "b", 4, max_tokens=4)
    assert names(step(s)) == ["a", "b"]  # a is done after its first token
    clock.now = 0.001
    add(s, "c", 4, max_tokens=1, t=0.001)
    while any(x.request_id == "b" for x in s.running):
        assert "c" not in names(step(s)), "a later arrival joined a static batch"
    assert names(step(s)) == ["c"]


def test_static_gathers_for_batch_wait_ms_or_until_full() -> None:
    clock = Clock()
    s = make(policy="static", max_num_seqs=3, batch_wait_ms=50, clock=clock)
    add(s, "a", 4, t=0.0)
    clock.now = 0.01
    assert step(s).is_empty
    add(s, "b", 4, t=0.02)
    clock.now = 0.049
    assert step(s).is_empty
    clock.now = 0.05
    assert names(step(s)) == ["a", "b"]
    run_all(s)
    add(s, "c", 4, t=1.0)
    add(s, "d", 4, t=1.0)
    add(s, "e", 4, t=1.0)
    assert names(step(s)) == ["c", "d", "e"], "a full batch must not wait"


def test_token_budget_limits_a_step_without_chunking() -> None:
    s = make(policy="continuous", max_num_batched_tokens=16)
    add(s, "a", 10)
    add(s, "b", 10)
    assert names(step(s)) == ["a"]
    second = step(s)
    assert names(second) == ["a", "b"] and second.num_batched_tokens == 11
    run_all(s)


def test_chunked_prefill_splits_a_long_prompt_while_decodes_continue() -> None:
    s = make(policy="continuous", max_num_batched_tokens=16, chunked_prefill=True)
    a = add(s, "a", 4, max_tokens=10)
    step(s)
    b = add(s, "b", 40, max_tokens=2)
    chunks = []
    while b.num_output_tokens == 0:
        out = step(s)
        assert out.num_batched_tokens <= 16
        by_name = {x.seq.request_id: x for x in out.scheduled}
        assert by_name["a"].num_tokens == 1, "the decode must run in every step"
        chunks.append((by_name["b"].num_tokens, by_name["b"].sample))
    assert sum(n for n, _ in chunks) == 40
    assert [sample for _, sample in chunks] == [False] * (len(chunks) - 1) + [True]
    assert a.num_output_tokens == 1 + len(chunks)
    run_all(s)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_prompt_of_max_model_len_minus_one_is_schedulable(chunked: bool) -> None:
    budget = 16 if chunked else 64
    s = make(max_model_len=64, max_num_batched_tokens=budget, chunked_prefill=chunked, num_blocks=16)
    seq = add(s, "long", 63, max_tokens=10)
    run_all(s)
    assert seq.num_output_tokens == 1 and seq.finish_reason == "length"


def test_preemption_frees_blocks_and_recomputes_prompt_plus_output() -> None:
    s = make(policy="continuous", num_blocks=6, block_size=4)
    a = add(s, "a", 8, max_tokens=12, t=0.0)
    b = add(s, "b", 8, max_tokens=12, t=1.0)
    outs = run_all(s)
    preempted = [p.request_id for o in outs for p in o.preempted]
    assert preempted and set(preempted) == {"b"}, "the latest arrival is the victim"
    assert b.num_preemptions == len(preempted) and s.num_preemptions == len(preempted)
    recomputes = [x for o in outs for x in o.scheduled if x.seq is b and x.start == 0]
    assert len(recomputes) == 1 + len(preempted)
    assert all(x.num_tokens > 8 for x in recomputes[1:]), "recompute covers prompt + output so far"
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12


def test_priority_order_preempts_the_lowest_priority() -> None:
    s = make(policy="continuous", queue_order="priority", num_blocks=6, block_size=4)
    add(s, "low", 8, max_tokens=12, priority=5, t=0.0)
    add(s, "high", 8, max_tokens=12, priority=0, t=1.0)
    outs = run_all(s)
    assert {p.request_id for o in outs for p in o.preempted} == {"low"}


def test_new_requests_wait_when_blocks_run_out() -> None:
    s = make(policy="continuous", num_blocks=4, block_size=4)
    add(s, "a", 12, max_tokens=2)
    add(s, "b", 8, max_tokens=2)
    assert names(step(s)) == ["a"]  # b needs 2 blocks, only 1 is free
    run_all(s)


@pytest.mark.parametrize("policy", ["request", "static", "continuous"])
def test_a_cached_prefix_is_not_computed_again(policy: str) -> None:
    s = make(policy=policy, block_size=4, prefix_caching=True, batch_wait_ms=0)
    add(s, "a", 10)
    run_all(s)
    b = add(s, "b", 10)
    first = step(s).scheduled
    assert [(x.seq, x.start, x.num_tokens) for x in first] == [(b, 8, 2)]  # two cached blocks of four
    run_all(s)
    assert (s.num_prefix_hit_tokens, s.num_prefix_query_tokens) == (8, 20)


def test_an_admission_that_does_not_fit_holds_no_shared_blocks() -> None:
    s = make(policy="continuous", num_blocks=5, block_size=4, prefix_caching=True)
    add(s, "a", 9, max_tokens=1)
    run_all(s)  # a's two full blocks stay cached, unheld
    add(s, "long", 4, max_tokens=60)
    step(s)
    b = add(s, "b", 17, max_tokens=1)  # hits 8 tokens, then needs 3 more blocks
    out = step(s)  # long's decode takes a second block: of 5, 1 is left beside b's 2 cached ones
    assert [x.seq.request_id for x in out.scheduled] == ["long"]
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert s.block_manager.num_used_blocks == 2 and s.block_manager.num_free_blocks == 3


def test_finish_reasons() -> None:
    s = make(eos=(TOKEN,), max_model_len=12)
    stop = add(s, "eos", 4, max_tokens=5)
    ignore = add(s, "ignore", 4, max_tokens=5, ignore_eos=True)
    stop_id = add(s, "stop-id", 4, max_tokens=5, ignore_eos=True, stop_token_ids=(TOKEN,))
    capped = add(s, "cap", 8, max_tokens=100, ignore_eos=True)
    run_all(s)
    assert (stop.finish_reason, stop.num_output_tokens) == ("stop", 1)
    assert (ignore.finish_reason, ignore.num_output_tokens) == ("length", 5)
    assert (stop_id.finish_reason, stop_id.num_output_tokens) == ("stop", 1)
    assert (capped.finish_reason, capped.num_tokens) == ("length", 12)


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    s = make(max_num_seqs=1)
    add(s, "running", 9, max_tokens=50)
    add(s, "waiting", 4)
    step(s)
    assert s.block_manager.num_used_blocks == 3
    assert s.abort("running") is not None and s.abort("waiting") is not None
    assert s.abort("unknown") is None
    assert s.block_manager.num_used_blocks == 0 and not s.has_unfinished()


def test_duplicate_request_id_is_refused() -> None:
    s = make()
    add(s, "x", 4)
    with pytest.raises(ValueError, match="already in the engine"):
        add(s, "x", 4)


def test_seconds_until_batch_tells_the_loop_how_long_to_sleep() -> None:
    clock = Clock()
    s = make(policy="static", max_num_seqs=3, batch_wait_ms=50, clock=clock)
    assert s.seconds_until_batch() == 0.0
    add(s, "a", 4, t=0.0)
    clock.now = 0.02
    assert s.seconds_until_batch() == pytest.approx(0.03)
    clock.now = 0.06
    assert s.seconds_until_batch() == 0.0
