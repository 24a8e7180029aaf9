"""AsyncEngine: many concurrent streams, aborts, metrics and health on the real tiny model."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from prometheus_client import generate_latest

from serving.config import DeploymentConfig
from serving.engine.async_engine import AsyncEngine, EngineDeadError
from serving.engine.factory import build_client
from serving.engine.llm_engine import LLMEngine, eos_token_ids
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams

VOCAB = 32000


def deployment(**flat: Any) -> DeploymentConfig:
    base = {"model.path": "llama-tiny", "model.max_model_len": 256, "cache.block_size": 8, "device": "cpu"}
    return DeploymentConfig.from_flat({**base, **flat})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(paged_tiny_model: torch.nn.Module) -> torch.nn.Module:
    return paged_tiny_model


async def started(model: torch.nn.Module, num_blocks: int = 64, **flat: Any) -> AsyncEngine:
    llm = LLMEngine(
        deployment(**flat), model, eos_token_ids=eos_token_ids(model, None), num_blocks=num_blocks
    )
    engine = AsyncEngine(llm, model_name="llama-tiny")
    await engine.start()
    return engine


@pytest.fixture
async def async_engine(model: torch.nn.Module) -> AsyncIterator[AsyncEngine]:
    engine = await started(model)
    yield engine
    await engine.shutdown()


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    tokens: list[int] = []
    last: RequestOutput | None = None
    async for out in engine.generate(rid, prompt, params):
        assert out.request_id == rid and not (last and last.finished)
        tokens.extend(out.new_token_ids)
        assert out.num_output_tokens == len(tokens)
        last = out
    assert last is not None and last.finished
    return tokens


@pytest.mark.parametrize("policy", ["continuous", "static"])
async def test_64_concurrent_requests_finish_with_exact_counts(model: torch.nn.Module, policy: str) -> None:
    # 40 blocks x 8 tokens = 320 cached tokens for ~64 x 80: requests wait for blocks and get preempted.
    engine = await started(model, num_blocks=40, **{"scheduler.policy": policy, "scheduler.batch_wait_ms": 5})
    rnd = random.Random(0)
    jobs = []
    for i in range(64):
        prompt = [rnd.randrange(VOCAB) for _ in range(rnd.randint(1, 120))]
        params = SamplingParams(max_tokens=rnd.randint(1, 24), ignore_eos=True, temperature=0.7, seed=i)
        jobs.append((f"r{i}", prompt, params))
    results = await asyncio.gather(*(collect(engine, *job) for job in jobs))
    assert [len(r) for r in results] == [p.max_tokens for _, _, p in jobs]
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    if policy == "continuous":
        assert stats.num_preemptions > 0
    assert engine.is_healthy()
    await engine.shutdown()
    assert not engine.is_healthy()


async def test_streams_match_the_synchronous_engine(
    async_engine: AsyncEngine, model: torch.nn.Module
) -> None:
    prompts = [[5, 6, 7], list(range(100, 140)), [9] * 17]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    expected = LLMEngine(
        deployment(), model, eos_token_ids=eos_token_ids(model, None), num_blocks=64
    ).generate(prompts, greedy)
    got = await asyncio.gather(*(collect(async_engine, f"s{i}", p, greedy) for i, p in enumerate(prompts)))
    assert list(got) == expected


async def test_closing_a_stream_aborts_and_frees_blocks(async_engine: AsyncEngine) -> None:
    stream = async_engine.generate(
        "gone", list(range(1, 60)), SamplingParams(max_tokens=200, ignore_eos=True)
    )
    first = await stream.__anext__()
    assert first.num_output_tokens == 1
    assert async_engine.stats().kv_blocks_used > 0
    await stream.aclose()
    for _ in range(200):
        if async_engine.stats().kv_blocks_used == 0:
            break
        await asyncio.sleep(0.01)
    assert async_engine.stats().kv_blocks_used == 0 and async_engine.stats().num_running == 0


async def test_abort_ends_the_stream_with_reason_abort(async_engine: AsyncEngine) -> None:
    outs: list[RequestOutput] = []
    async for out in async_engine.generate("a", [1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True)):
        outs.append(out)
        if len(outs) == 3:
            await async_engine.abort("a")
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert outs[-1].num_output_tokens >= 3 and async_engine.stats().kv_blocks_used == 0


async def test_bad_requests_raise_before_streaming(async_engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        async for _ in async_engine.generate("long", [1] * 256, SamplingParams(max_tokens=1)):
            pass
    with pytest.raises(ValueError, match="empty"):
        async for _ in async_engine.generate("empty", [], SamplingParams(max_tokens=1)):
            pass
    assert async_engine.is_healthy()


async def test_metrics_follow_the_engine(async_engine: AsyncEngine) -> None:
    await collect(async_engine, "m", [1, 2, 3, 4], SamplingParams(max_tokens=5, ignore_eos=True))
    text = generate_latest(async_engine.registry).decode()
    for name, value in [
        ("serving_prompt_tokens_total", 4.0),
        ("serving_generation_tokens_total", 5.0),
        ("serving_kv_cache_blocks_total", 64.0),
        ("serving_kv_cache_blocks_used", 0.0),
        ("serving_num_requests_running", 0.0),
        ("serving_num_requests_waiting", 0.0),
        ("serving_num_preemptions_total", 0.0),
        ("serving_step_duration_seconds_count", 5.0),
    ]:
        assert f"{name} {value}" in text, name


async def test_a_dead_step_loop_fails_streams_and_health(model: torch.nn.Module) -> None:
    engine = await started(model)

    def broken(*args: Any) -> list[int]:
        raise RuntimeError("injected failure")

    engine.engine.runner.execute = broken  # type: ignore[method-assign, assignment]
    with pytest.raises(EngineDeadError, match="injected failure"):
        await collect(engine, "x", [1, 2, 3], SamplingParams(max_tokens=3))
    assert not engine.is_healthy()
    with pytest.raises(EngineDeadError):
        await collect(engine, "y", [1, 2, 3], SamplingParams(max_tokens=3))
    await engine.shutdown()


async def test_from_config_loads_the_shipped_model_and_tokenizer() -> None:
    engine = build_client(deployment(**{"cache.kv_cache_memory_gb": 0.01}))
    assert engine.model_name == "llama-tiny" and engine.max_model_len == 256
    assert engine.stats().kv_blocks_total == int(0.01 * 1024**3) // (8 * 512)
    await engine.start()
    try:
        ids = engine.tokenizer.encode("Hello there")
        tokens = await collect(engine, "hello", ids, SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(tokens) == 4
    finally:
        await engine.shutdown()
