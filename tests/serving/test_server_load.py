"""Many concurrent streams get exactly their tokens; every KV block comes back, also after disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from typing import Any

import httpx

from serving.launch import ServerProcess

MODEL = "llama-tiny"


def gauge(metrics_text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics_text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 30.0) -> str:
    """/metrics once no request runs or waits and no KV block is held (or the last text at time-out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = (await client.get("/metrics")).text
        busy = sum(
            gauge(text, name)
            for name in (
                "serving_kv_cache_blocks_used",
                "serving_num_requests_running",
                "serving_num_requests_waiting",
            )
        )
        if busy == 0 or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.1)


async def stream_tokens(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, int, int, str]:
    """(chunks with choices, usage prompt tokens, usage completion tokens, text) of one streamed request."""
    chunks, usage, text = 0, {}, ""
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line.removeprefix("data: "))
            if data["choices"]:
                chunks += 1
                text += data["choices"][0]["text"]
            else:
                usage = data["usage"]
    return chunks, usage["prompt_tokens"], usage["completion_tokens"], text


async def test_64_concurrent_streams_get_exactly_max_tokens(tiny_server: ServerProcess) -> None:
    rng = random.Random(0)
    bodies: list[dict[str, Any]] = [
        {
            "model": MODEL,
            "prompt": [rng.randrange(100, 30000) for _ in range(rng.randrange(4, 200))],
            "max_tokens": rng.randrange(1, 48),
            "ignore_eos": True,
            "temperature": rng.choice([0.0, 1.0]),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(64)
    ]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=tiny_server.url, timeout=300, limits=limits) as client:
        results = await asyncio.gather(*(stream_tokens(client, body) for body in bodies))
        for body, (chunks, prompt_tokens, completion_tokens, _) in zip(bodies, results, strict=True):
            assert prompt_tokens == len(body["prompt"])
            assert completion_tokens == body["max_tokens"]
            assert chunks == body["max_tokens"]
        metrics = await wait_idle(client)
    assert gauge(metrics, "serving_kv_cache_blocks_used") == 0
    assert gauge(metrics, "serving_num_requests_running") == 0
    assert gauge(metrics, "serving_kv_cache_blocks_total") > 0


async def test_client_disconnect_aborts_and_frees_blocks(tiny_server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "prompt": "Tell me everything",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=tiny_server.url, timeout=60) as client:
        for _ in range(4):
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                seen = 0
                async for line in reply.aiter_lines():
                    seen += line.startswith("data: {")
                    if seen == 3:
                        break  # leaving the block closes the connection mid-stream
        # non-streamed requests are aborted too when their client gives up
        with_timeout = httpx.AsyncClient(base_url=tiny_server.url, timeout=0.3)
        async with with_timeout:
            with contextlib.suppress(httpx.TimeoutException):
                await with_timeout.post("/v1/completions", json={**body, "stream": False})
        metrics = await wait_idle(client)
        assert gauge(metrics, "serving_kv_cache_blocks_used") == 0
        assert gauge(metrics, "serving_num_requests_running") == 0
        assert 'serving_request_finished_total{finish_reason="disconnect"} 5.0' in metrics
        # and the server still serves
        again = await client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 5})
        assert again.json()["usage"]["completion_tokens"] == 5
