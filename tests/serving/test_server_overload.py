"""Overload: a full server refuses with 429 + Retry-After, deadlines abort, disconnects free at once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import httpx
import psutil
import pytest

from serving.launch import ServerProcess
from tests.serving.conftest import start_healthy, tiny_deployment
from tests.serving.test_server_load import gauge, wait_idle

MODEL = "llama-tiny"
LONG = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 480, "ignore_eos": True}


async def _open_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    request = client.build_request("POST", "/v1/completions", json={**body, "stream": True})
    return await client.send(request, stream=True)


async def _until(client: httpx.AsyncClient, ok: Callable[[str], bool], timeout_s: float = 10.0) -> float:
    """Seconds until ok(/metrics text) holds; fails the test at timeout_s."""
    start = time.monotonic()
    while not ok((await client.get("/metrics")).text):
        assert time.monotonic() - start < timeout_s, "condition not reached"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One running and two waiting requests at most."""
    config = tiny_deployment(**{"scheduler.max_num_seqs": 1, "server.max_waiting": 2})
    server = start_healthy(config, tmp_path_factory.mktemp("small-server") / "server.log")
    try:
        yield server
    finally:
        server.stop()


async def test_full_server_refuses_with_429_and_retry_after(small_server: ServerProcess) -> None:
    # 1 running + 2 waiting: of 10 long streams opened at once, 3 are admitted
    server = small_server
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        body = {**LONG, "max_tokens": 150}
        replies = await asyncio.gather(*(_open_stream(client, body) for _ in range(10)))
        refused = [r for r in replies if r.status_code == 429]
        admitted = [r for r in replies if r.status_code == 200]
        assert (len(admitted), len(refused)) == (3, 7), [r.status_code for r in replies]
        error = json.loads(await refused[0].aread())["error"]
        assert refused[0].headers["retry-after"] == "1"
        assert error["code"] == "too_many_requests"
        assert "server.max_waiting" in error["message"]
        for reply in admitted:
            text = (await reply.aread()).decode()  # each runs to its end in turn
            assert text.rstrip().endswith("data: [DONE]")
        for reply in replies:
            await reply.aclose()
        metrics = await wait_idle(client)
        assert gauge(metrics, "serving_kv_cache_blocks_used") == 0
        assert gauge(metrics, "serving_admitted_requests") == 0
        assert gauge(metrics, "serving_admission_rejected_total") == 7
        # the slots came back: the server admits again
        again = await client.post("/v1/completions", json={**LONG, "max_tokens": 3})
        assert again.status_code == 200


async def test_request_timeout_aborts_and_answers_504(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(**{"server.request_timeout_s": 0.3})
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        started = time.monotonic()
        reply = await client.post("/v1/completions", json=LONG)
        assert reply.status_code == 504, reply.text
        assert reply.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 5
        async with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as stream:
            assert stream.status_code == 200
            events = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
        metrics = await wait_idle(client)
        assert gauge(metrics, "serving_kv_cache_blocks_used") == 0
        short = await client.post("/v1/completions", json={**LONG, "max_tokens": 3})
        assert short.status_code == 200


async def test_disconnect_while_waiting_frees_at_once(small_server: ServerProcess) -> None:
    server = small_server
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        running = await _open_stream(client, LONG)
        waiting = await _open_stream(client, LONG)
        await _until(client, lambda m: gauge(m, "serving_num_requests_waiting") == 1)
        await waiting.aclose()
        freed_waiting = await _until(client, lambda m: gauge(m, "serving_num_requests_waiting") == 0)
        assert gauge((await client.get("/metrics")).text, "serving_num_requests_running") == 1
        await running.aclose()
        freed_running = await _until(client, lambda m: gauge(m, "serving_kv_cache_blocks_used") == 0)
        assert freed_waiting < 1.0 and freed_running < 1.0, (freed_waiting, freed_running)


async def _flood_one(session: aiohttp.ClientSession, url: str) -> int | str:
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 16, "ignore_eos": True}
    try:
        async with session.post(url + "/v1/completions", json=body) as reply:
            await reply.read()
            return reply.status
    except (TimeoutError, aiohttp.ClientError) as err:
        return type(err).__name__


@pytest.mark.slow
async def test_flood_of_2000_is_bounded(start_server: Callable[..., ServerProcess]) -> None:
    """2,000 simultaneous requests at the defaults (max_waiting 256): every one answered 200 or 429 well
    before a client time-out, the server's memory bounded, every block free after."""
    server = start_server(**{"scheduler.max_num_seqs": 32})
    assert server.pid is not None
    process = psutil.Process(server.pid)
    rss_before = process.memory_info().rss
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        results = await asyncio.gather(*(_flood_one(session, server.url) for _ in range(2000)))
        took = time.monotonic() - started
    rss_after = process.memory_info().rss
    counts = {code: results.count(code) for code in set(results)}
    assert set(counts) <= {200, 429}, counts
    assert counts.get(200, 0) >= 32 + 256, counts
    assert took < 60, took
    assert rss_after - rss_before < 150 * 2**20, (rss_before, rss_after)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        metrics = await wait_idle(client)
    assert gauge(metrics, "serving_kv_cache_blocks_used") == 0
    print(f"flood: {counts} in {took:.1f} s, rss {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
