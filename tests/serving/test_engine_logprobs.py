"""Engine logprobs equal log_softmax of one plain transformers forward over prompt + output, for every
policy, with chunked prefill and under preemption (prompt logprobs are computed once)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from serving.config import DeploymentConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.model_loader import load_model
from serving.engine.outputs import RequestOutput, TokenLogprob
from serving.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = (
    [31994, 450, 4996, 17354, 1701, 432, 29889, 22, 7, 901, 12, 40, 3, 88, 1200, 9, 31, 650, 2, 14],
    [31994, 77, 6000],
    [5],
)
"""20 tokens (two prefill chunks under a 16-token step budget), 3, and 1 (no prompt logprobs at all)."""
MAX_TOKENS = 6


def engine_for(model: torch.nn.Module, num_blocks: int | None = None, **flat: Any) -> LLMEngine:
    base = {"model.path": "llama-tiny", "model.max_model_len": 32, "cache.block_size": 8, "device": "cpu"}
    return LLMEngine(DeploymentConfig.from_flat({**base, **flat}), model, num_blocks=num_blocks)


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    base = {"model.path": "llama-tiny", "model.max_model_len": 128, "device": "cpu"}
    return load_model(DeploymentConfig.from_flat(base), "sdpa", torch.device("cpu"))


def run(engine: LLMEngine, params: SamplingParams) -> dict[str, list[RequestOutput]]:
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    outputs: dict[str, list[RequestOutput]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def expected(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log_softmax at every position of ids (row p scores token p + 1)."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0]  # type: ignore[operator]
    return torch.log_softmax(logits.float(), dim=-1)


def check(scored: list[TokenLogprob], ids: list[int], first: int, table: torch.Tensor, num_top: int) -> None:
    """scored[k] is the logprob of ids[first + k] from row first + k - 1 of the reference table."""
    assert [s.token_id for s in scored] == ids[first : first + len(scored)]
    for k, s in enumerate(scored):
        row = table[first + k - 1]
        assert s.logprob == pytest.approx(row[s.token_id].item(), abs=1e-4)
        assert s.rank == int((row > row[s.token_id] + 1e-6).sum()) + 1
        assert len(s.top) == num_top
        top = row.topk(num_top)
        assert [t for t, _ in s.top] == top.indices.tolist()
        assert [lp for _, lp in s.top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    "flat",
    [
        {"scheduler.policy": "continuous"},
        {
            "scheduler.policy": "continuous",
            "scheduler.chunked_prefill": True,
            "scheduler.max_num_batched_tokens": 16,
            "scheduler.max_num_seqs": 4,
        },
        {"scheduler.policy": "static"},
        {"scheduler.policy": "request"},
    ],
    ids=["continuous", "chunked", "static", "request"],
)
def test_logprobs_match_a_plain_forward(
    engine_tiny_model: torch.nn.Module, hf_model: torch.nn.Module, flat: dict[str, Any]
) -> None:
    engine = engine_for(engine_tiny_model, **flat)
    check_run(engine, hf_model)


def check_run(engine: LLMEngine, hf_model: torch.nn.Module) -> None:
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    for rid, outs in run(engine, params).items():
        prompt = PROMPTS[int(rid[1:])]
        ids = prompt + [t for o in outs for t in o.new_token_ids]
        table = expected(hf_model, ids)
        sampled = [lp for o in outs for lp in o.new_logprobs or []]
        assert len(sampled) == MAX_TOKENS
        check(sampled, ids, len(prompt), table, 3)
        assert all(s.rank == 1 for s in sampled), "greedy tokens are the most likely"
        assert outs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outs[1:])
        assert len(outs[0].prompt_logprobs) == len(prompt) - 1
        check(outs[0].prompt_logprobs, ids, 1, table, 2)
    assert engine.runner.logprobs.is_empty()


def test_preempted_requests_report_prompt_logprobs_once(
    engine_tiny_model: torch.nn.Module, hf_model: torch.nn.Module
) -> None:
    """Four blocks of eight tokens cannot hold all three requests (seven blocks) to their end."""
    engine = engine_for(engine_tiny_model, num_blocks=4, **{"scheduler.policy": "continuous"})
    check_run(engine, hf_model)
    assert engine.scheduler.num_preemptions > 0


def test_no_logprobs_unless_asked(engine_tiny_model: torch.nn.Module) -> None:
    engine = engine_for(engine_tiny_model)
    outs = run(engine, SamplingParams(max_tokens=3, temperature=0.8, seed=1))
    assert all(o.new_logprobs is None and o.prompt_logprobs is None for r in outs.values() for o in r)


def test_sampled_token_logprob_is_of_the_raw_distribution(
    engine_tiny_model: torch.nn.Module, hf_model: torch.nn.Module
) -> None:
    """At temperature 1.5 the reported logprobs are still the model's own (vLLM's raw_logprobs)."""
    engine = engine_for(engine_tiny_model)
    params = SamplingParams(max_tokens=4, temperature=1.5, seed=7, ignore_eos=True, logprobs=0)
    for rid, outs in run(engine, params).items():
        prompt = PROMPTS[int(rid[1:])]
        ids = prompt + [t for o in outs for t in o.new_token_ids]
        check([lp for o in outs for lp in o.new_logprobs or []], ids, len(prompt), expected(hf_model, ids), 0)


@pytest.mark.parametrize("name", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, 21])
def test_out_of_range_counts_are_refused_by_name(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{name}={value} is invalid: use 0 to 20"):
        SamplingParams(max_tokens=1, **{name: value})
