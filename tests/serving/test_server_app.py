"""The app in-process around a real AsyncEngine: what a dead engine looks like to clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httpx
import pytest

from serving.config import DeploymentConfig
from serving.engine.async_engine import AsyncEngine
from serving.engine.factory import build_client
from serving.server.app import build_app


@pytest.fixture
async def engine(make_config: Callable[..., DeploymentConfig]) -> AsyncIterator[AsyncEngine]:
    engine = cast(AsyncEngine, build_client(make_config()))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def test_health_turns_503_and_requests_are_refused_once_the_engine_stops(engine: AsyncEngine) -> None:
    transport = httpx.ASGITransport(app=build_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get("/health")).status_code == 200
        ok = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "ignore_eos": True})
        assert ok.json()["usage"]["completion_tokens"] == 2
        await engine.shutdown()
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["error"]["type"] == "server_error"
        refused = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503
        assert "not healthy" in refused.json()["error"]["message"]
        # metadata endpoints keep answering for diagnosis
        assert (await client.get("/v1/models")).status_code == 200
        assert "serving_kv_cache_blocks_used" in (await client.get("/metrics")).text


async def test_a_step_loop_that_dies_mid_stream_ends_the_stream_with_an_error_event(
    engine: AsyncEngine,
) -> None:
    calls = 0
    execute = engine.engine.runner.execute

    def fails_on_the_fourth_step(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("injected failure")
        return execute(*args)

    engine.engine.runner.execute = fails_on_the_fourth_step  # type: ignore[method-assign, assignment]
    transport = httpx.ASGITransport(app=build_app(engine))
    body = {"prompt": "hi", "max_tokens": 20, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        reply = await client.post("/v1/completions", json=body)
        events = [e.removeprefix("data: ") for e in reply.text.split("\n\n") if e]
        assert reply.status_code == 200
        assert len(events) == 3 + 2  # three tokens, the error, [DONE]
        error = json.loads(events[3])["error"]
        assert error["type"] == "server_error" and "injected failure" in error["message"]
        assert events[-1] == "[DONE]"
        assert (await client.get("/health")).status_code == 503
