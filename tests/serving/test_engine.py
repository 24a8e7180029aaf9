"""LLMEngine on the real tiny model: greedy tokens equal transformers' generate for every policy x backend."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from serving.config import ConfigError, DeploymentConfig
from serving.engine.llm_engine import LLMEngine, eos_token_ids
from serving.engine.model_loader import load_model
from serving.engine.sampling_params import SamplingParams

PROMPT_LENS = (1, 5, 17, 33, 64, 9)
MAX_TOKENS = 10
VOCAB = 32000


def deployment(**flat: Any) -> DeploymentConfig:
    base = {"model.path": "llama-tiny", "model.max_model_len": 128, "cache.block_size": 8, "device": "cpu"}
    return DeploymentConfig.from_flat({**base, **flat})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(engine_tiny_model: torch.nn.Module) -> torch.nn.Module:
    return engine_tiny_model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB - 100, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    """The same seeded weights under transformers' own sdpa attention."""
    return load_model(deployment(), "sdpa", torch.device("cpu"))


def hf_generate(hf_model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = hf_model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False)  # type: ignore[operator]
            out.append(ids[0, len(p) :].tolist())
    return out


@pytest.fixture(scope="module")
def reference(hf_model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' generate (DynamicCache, greedy, stops on eos like the engine) per prompt."""
    out = hf_generate(hf_model, prompts, MAX_TOKENS)
    assert len({tuple(o) for o in out}) == len(out), "weights too weak: outputs repeat"
    assert any(len(set(o)) > 3 for o in out), "weights too weak: greedy output repeats one token"
    return out


def engine(model: torch.nn.Module, flat: dict[str, Any] | None = None, num_blocks: int = 64) -> LLMEngine:
    eos = eos_token_ids(model, None)
    return LLMEngine(deployment(**(flat or {})), model, eos_token_ids=eos, num_blocks=num_blocks)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.mark.parametrize(
    ("policy", "attention"),
    list(itertools.product(["request", "static", "continuous"], ["eager", "sdpa", "paged"])),
)
def test_greedy_tokens_equal_generate(
    model: torch.nn.Module, prompts: list[list[int]], reference: list[list[int]], policy: str, attention: str
) -> None:
    eng = engine(model, {"scheduler.policy": policy, "attention": attention, "scheduler.batch_wait_ms": 0})
    assert eng.generate(prompts, GREEDY) == reference
    assert eng.stats().kv_blocks_used == 0


@pytest.mark.parametrize("attention", ["sdpa", "paged"])
def test_preemption_under_a_tiny_block_budget_gives_the_same_tokens(
    model: torch.nn.Module, hf_model: torch.nn.Module, prompts: list[list[int]], attention: str
) -> None:
    chosen = prompts[1:4]  # 55 prompt tokens + 3 x 30 output > 128 cached tokens
    eng = engine(model, {"attention": attention}, num_blocks=16)  # 128 tokens: one max_model_len request
    assert eng.generate(chosen, SamplingParams(max_tokens=30, temperature=0)) == hf_generate(
        hf_model, chosen, 30
    )
    stats = eng.stats()
    assert stats.num_preemptions > 0 and stats.kv_blocks_used == 0


@pytest.mark.parametrize("attention", ["eager", "paged"])
def test_chunked_prefill_gives_the_same_tokens(
    model: torch.nn.Module, prompts: list[list[int]], reference: list[list[int]], attention: str
) -> None:
    flat: dict[str, Any] = {
        "scheduler.chunked_prefill": True,
        "scheduler.max_num_batched_tokens": 16,
        "attention": attention,
    }
    flat["scheduler.max_num_seqs"] = 8
    eng = engine(model, flat)
    assert eng.generate(prompts, GREEDY) == reference
    assert eng.stats().kv_blocks_used == 0


def test_queue_orders_and_small_batches_give_the_same_tokens(
    model: torch.nn.Module, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    for order in ("priority", "sjf"):
        eng = engine(model, {"scheduler.queue_order": order, "scheduler.max_num_seqs": 2})
        assert eng.generate(prompts, GREEDY) == reference


def test_seeded_sampling_repeats_whatever_else_runs(model: torch.nn.Module, prompts: list[list[int]]) -> None:
    seeded = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=7)
    alone = engine(model).generate([prompts[2]], seeded)[0]
    crowded = engine(model).generate([prompts[0], prompts[2], prompts[3]], [GREEDY, seeded, GREEDY])[1]
    assert alone == crowded
    other = engine(model).generate([prompts[2]], SamplingParams(max_tokens=MAX_TOKENS, seed=8))[0]
    assert other != alone
    assert all(0 <= t < VOCAB for t in alone)


def test_top_p_near_zero_is_greedy(
    model: torch.nn.Module, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    narrow = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=1e-6)
    assert engine(model).generate(prompts, narrow) == reference


def test_extreme_sampling_values_never_kill_the_step(
    model: torch.nn.Module, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    # found by fuzzing the server: a top_p float32 rounds to 0, or logits / 1e-320, gave a NaN
    # distribution and torch.multinomial killed the step loop for every request
    for temperature, top_p in ((1.0, 1e-320), (1e-320, 1.0), (1e-320, 1e-320)):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, top_p=top_p)
        assert engine(model).generate(prompts[:2], params) == reference[:2]
    hot = SamplingParams(max_tokens=MAX_TOKENS, temperature=1e308, top_p=0.5, seed=1)
    assert all(0 <= t < VOCAB for t in engine(model).generate(prompts[:1], hot)[0])
    with pytest.raises(ValueError, match="temperature=inf"):
        SamplingParams(max_tokens=1, temperature=float("inf"))


def test_outputs_never_pass_max_model_len(model: torch.nn.Module, prompts: list[list[int]]) -> None:
    eng = engine(model, {"model.max_model_len": 70})
    long = SamplingParams(max_tokens=50, ignore_eos=True)
    outs = eng.generate([prompts[4], prompts[1]], long)
    assert [len(o) for o in outs] == [70 - 64, 50]


def test_bad_requests_are_refused_up_front(model: torch.nn.Module) -> None:
    eng = engine(model)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="max_model_len=128"):
        eng.add_request("b", [1] * 128, GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request("c", [1, VOCAB], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert not eng.has_unfinished()


def test_kv_budget_below_one_request_is_a_config_error(model: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match=r"cache\.kv_cache_memory_gb"):
        LLMEngine(deployment(**{"cache.kv_cache_memory_gb": 1e-6}), model)
    sized = LLMEngine(deployment(**{"cache.kv_cache_memory_gb": 0.01}), model)
    # llama-tiny: 2 x 2 layers x 2 KV heads x 16 head dim x 4 bytes = 512 bytes per token.
    assert sized.num_blocks == int(0.01 * 1024**3) // (8 * 512)


def test_abort_frees_blocks(model: torch.nn.Module, prompts: list[list[int]]) -> None:
    eng = engine(model)
    eng.add_request("x", prompts[4], SamplingParams(max_tokens=50))
    eng.add_request("y", prompts[3], SamplingParams(max_tokens=50))
    eng.step()
    assert eng.stats().kv_blocks_used > 0
    final = eng.abort("x")
    assert final is not None and final.finish_reason == "abort" and final.finished
    assert eng.abort("x") is None
    eng.abort("y")
    assert eng.stats().kv_blocks_used == 0 and not eng.has_unfinished()


@pytest.fixture(scope="module")
def chat_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """A 20-token system prompt (two full blocks of 8) before each user turn; one turn is repeated."""
    system = prompts[3][:20]
    turns = [prompts[0], prompts[1], prompts[2][:12], prompts[1], prompts[5][:4]]
    return [system + turn for turn in turns]


@pytest.mark.parametrize("attention", ["eager", "sdpa", "paged"])
def test_prefix_caching_keeps_greedy_tokens(
    model: torch.nn.Module, hf_model: torch.nn.Module, chat_prompts: list[list[int]], attention: str
) -> None:
    expected = hf_generate(hf_model, chat_prompts, MAX_TOKENS)
    outputs: dict[bool, list[list[int]]] = {}
    for enabled in (False, True):
        eng = engine(model, {"attention": attention, "cache.enable_prefix_caching": enabled})
        first = eng.generate(chat_prompts[:2], GREEDY)  # admitted together: they fill the cache
        outputs[enabled] = first + eng.generate(chat_prompts[2:], GREEDY)
        assert eng.stats().kv_blocks_used == 0
        hits = eng.scheduler.num_prefix_hit_tokens
        # 16 system tokens (two full blocks) for each later prompt; the repeat (25 tokens) finds 3 blocks
        assert hits == (16 + 24 + 16 if enabled else 0)
    assert outputs[True] == outputs[False] == expected
