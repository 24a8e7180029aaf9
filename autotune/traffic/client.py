"""Send one streaming request and time it as vLLM's bench serve does (docs/bench.md, Metrics).

Every failure (HTTP status, time-out, dropped stream, malformed SSE, error event) becomes a RequestRecord
with error_kind and error set: a benchmark never crashes on what a server does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httpx

from autotune.traffic.config import ClientConfig, WorkloadConfig
from autotune.traffic.records import RequestRecord
from autotune.traffic.sse import SSEDecoder
from autotune.traffic.workload import PreparedRequest

_ERROR_BODY_CHARS = 300


class RequestFailed(Exception):
    """A failure with its kind (one of records.FAILURE_KINDS)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


HttpClient = aiohttp.ClientSession | httpx.AsyncClient
Opened = tuple[int, AsyncIterator[bytes], Callable[[], Awaitable[bytes]]]


def make_http_client(client: ClientConfig, pool_size: int) -> HttpClient:
    """One keep-alive pool for the whole run, sized to the requests that can be in flight (call in a loop).

    aiohttp by default: on this machine it spends 0.2 ms of CPU per streamed request where httpx (httpcore +
    anyio) spends 1.1-1.5 ms, which caps one client process near 700 req/s; httpx stays selectable.
    """
    size = max(1, client.max_connections or pool_size)
    if client.http == "httpx":
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=120.0)
        timeout = httpx.Timeout(client.timeout_s, connect=client.connect_timeout_s, pool=None)
        return httpx.AsyncClient(limits=limits, timeout=timeout, http2=False)
    connector = aiohttp.TCPConnector(
        limit=size, limit_per_host=size, keepalive_timeout=120.0, force_close=False
    )
    session_timeout = aiohttp.ClientTimeout(total=None, sock_connect=client.connect_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=session_timeout, read_bufsize=2**18)


@contextlib.asynccontextmanager
async def _post(http: HttpClient, url: str, body: dict[str, Any]) -> AsyncIterator[Opened]:
    """(status, body chunks as they arrive, read whole body) for a POST, on either HTTP library."""
    if isinstance(http, aiohttp.ClientSession):
        async with http.post(url, json=body) as response:
            yield response.status, response.content.iter_any(), response.read
    else:
        async with http.stream("POST", url, json=body) as response:
            yield response.status_code, response.aiter_raw(), response.aread


def build_payload(model: str, workload: WorkloadConfig, req: PreparedRequest) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) for /v1/completions or /v1/chat/completions, streaming with usage."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": workload.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if workload.ignore_eos:
        body["ignore_eos"] = True
    if workload.api == "chat":
        return "/v1/chat/completions", {**body, "messages": req.messages()}
    return "/v1/completions", {**body, "prompt": req.prompt}


def new_record(req: PreparedRequest) -> RequestRecord:
    return RequestRecord(
        index=req.index,
        prompt_len=req.prompt_len,
        expected_prompt_len=req.prompt_len,
        expected_output_len=req.output_len,
    )


OnChunk = Callable[[], None] | None
"""Called once per choices message received (a token's worth of progress): the trial's watch uses it to
tell a slow server from a hung one. None: not reported."""


def _handle_message(data: str, record: RequestRecord, st: float, last: float, on_chunk: OnChunk) -> float:
    """Apply one SSE data payload to the record; returns the time of the latest choices message."""
    try:
        message = json.loads(data)
    except json.JSONDecodeError as error:
        raise RequestFailed("malformed_sse", f"data is not JSON ({error}): {data[:120]!r}") from error
    if not isinstance(message, dict):
        raise RequestFailed("malformed_sse", f"data is not a JSON object: {data[:120]!r}")
    if message.get("error"):
        raise RequestFailed("server_error_event", json.dumps(message["error"])[:_ERROR_BODY_CHARS])
    if message.get("choices"):
        now = time.perf_counter()
        if record.chunks == 0:
            record.ttft = now - st
        else:
            record.itl.append(now - last)
        record.chunks += 1
        last = now
        if on_chunk is not None:
            on_chunk()
    usage = message.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        record.output_tokens = int(usage["completion_tokens"])
        record.usage_reported = True
        if usage.get("prompt_tokens") is not None:
            record.prompt_len = int(usage["prompt_tokens"])
    return last


async def _stream(
    http: HttpClient, url: str, body: dict[str, Any], record: RequestRecord, origin: float, on_chunk: OnChunk
) -> None:
    decoder = SSEDecoder()
    st = time.perf_counter()
    record.start = st - origin
    last = st
    async with _post(http, url, body) as (status, chunks, read_all):
        if status != 200:
            text = (await read_all()).decode("utf-8", errors="replace")[:_ERROR_BODY_CHARS]
            raise RequestFailed("http_error", f"http_{status}: {text}")
        done = False
        async for chunk in chunks:
            if done:  # read to the end: a half-read response cannot go back to the keep-alive pool
                continue
            for data in decoder.feed(chunk):
                if data.strip() == "[DONE]":
                    done = True
                    break
                last = _handle_message(data, record, st, last, on_chunk)
        if not done:
            for data in decoder.flush():
                if data.strip() != "[DONE]":
                    last = _handle_message(data, record, st, last, on_chunk)
    if record.chunks == 0:
        raise RequestFailed("no_tokens", "the stream ended without a choices message (no first token)")
    record.latency = last - st
    if not record.usage_reported:
        record.output_tokens = record.chunks


async def send_request(
    http: HttpClient,
    base_url: str,
    model: str,
    workload: WorkloadConfig,
    req: PreparedRequest,
    record: RequestRecord,
    timeout_s: float,
    origin: float,
    on_chunk: OnChunk = None,
) -> RequestRecord:
    """Stream one request into `record`; record.start is t0 - origin (perf_counter clock). Never raises."""
    path, body = build_payload(model, workload, req)
    try:
        async with asyncio.timeout(timeout_s):
            await _stream(http, base_url + path, body, record, origin, on_chunk)
        record.success = True
    except RequestFailed as error:
        record.error_kind, record.error = error.kind, str(error)
    except (TimeoutError, httpx.TimeoutException) as error:
        record.error_kind, record.error = "timeout", f"no complete answer within {timeout_s} s ({error!r})"
    except (httpx.ConnectError, aiohttp.ClientConnectorError) as error:
        record.error_kind, record.error = "connect_error", repr(error)
    except (
        httpx.TransportError,
        aiohttp.ClientPayloadError,
        aiohttp.ClientOSError,
        aiohttp.ServerDisconnectedError,
    ) as error:
        record.error_kind, record.error = "stream_dropped", repr(error)
    except Exception as error:  # a benchmark must survive any server behaviour; the record says what happened
        record.error_kind, record.error = "client_error", repr(error)
    if not record.success:
        record.itl, record.ttft, record.latency = [], 0.0, 0.0
    return record
