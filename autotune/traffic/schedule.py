"""Send one client process's share of a benchmark: open loop on precomputed offsets, or closed loop.

The HTTP pool is made before the clock starts; every request is timed by client.send_request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune.traffic.client import HttpClient, OnChunk, make_http_client, new_record, send_request
from autotune.traffic.config import ClientConfig, WorkloadConfig
from autotune.traffic.records import RequestRecord
from autotune.traffic.workload import PreparedRequest

Tick = Callable[[], None]
Watch = Callable[[RequestRecord], None]
_MAX_OPEN_POOL = 4096


@dataclass(frozen=True)
class ClientPlan:
    """What one client process sends: requests with their offsets (None: closed loop) and its concurrency."""

    base_url: str
    model: str
    workload: WorkloadConfig
    client: ClientConfig
    items: tuple[tuple[PreparedRequest, float | None], ...]
    concurrency: int | None
    duration_s: float | None
    process: int = 0
    watch: Watch | None = None
    """Called with each record as its request is sent; the record fills in as the answer streams in
    (a load step's overload monitor reads the requests in flight through it)."""


async def _send_one(
    plan: ClientPlan,
    http: HttpClient,
    req: PreparedRequest,
    scheduled: float,
    origin: float,
    gate: asyncio.Semaphore | None,
    tick: Tick,
    on_chunk: OnChunk,
) -> RequestRecord:
    arrived = time.perf_counter()
    record = new_record(req)
    record.process, record.scheduled = plan.process, scheduled
    record.dispatch_lag = max(0.0, arrived - (origin + scheduled))
    if plan.watch is not None:
        plan.watch(record)
    args = (http, plan.base_url, plan.model, plan.workload, req, record, plan.client.timeout_s, origin)
    if gate is None:
        await send_request(*args, on_chunk)
    else:
        async with gate:
            record.client_queue_time = time.perf_counter() - arrived
            await send_request(*args, on_chunk)
    tick()
    return record


async def run_plan(
    plan: ClientPlan, http: HttpClient, origin: float | None, tick: Tick, on_chunk: OnChunk = None
) -> tuple[list[RequestRecord], float, float]:
    """Send the plan's requests (open loop on schedule, or closed loop); returns (records, origin, end).

    origin None: now. The HTTP client is made by the caller, before the clock starts (it costs ~20 ms).
    `tick` is called per finished request, `on_chunk` per token received (client.OnChunk).
    """
    origin = time.perf_counter() if origin is None else origin
    if plan.items and plan.items[0][1] is None:
        pending = iter(plan.items)
        deadline = None if plan.duration_s is None else origin + plan.duration_s

        async def worker() -> list[RequestRecord]:
            out = []
            for req, _ in pending:
                now = time.perf_counter()
                if deadline is not None and now > deadline:
                    break
                out.append(await _send_one(plan, http, req, now - origin, origin, None, tick, on_chunk))
            return out

        per_worker = await asyncio.gather(*(worker() for _ in range(plan.concurrency or 1)))
        records = sorted((r for rs in per_worker for r in rs), key=lambda r: r.index)
    else:
        gate = asyncio.Semaphore(plan.concurrency) if plan.concurrency else None
        tasks = []
        try:
            for req, offset in plan.items:
                assert offset is not None  # open-loop plans always carry offsets
                while (delay := origin + offset - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)  # loop: timers may fire early (uvloop has 1 ms resolution)
                tasks.append(
                    asyncio.create_task(_send_one(plan, http, req, offset, origin, gate, tick, on_chunk))
                )
            records = list(await asyncio.gather(*tasks))
        except asyncio.CancelledError:  # a load step stopped early: no request may outlive it
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    return records, origin, time.perf_counter()


def http_client_for(plan: ClientPlan) -> HttpClient:
    return make_http_client(plan.client, plan.concurrency or min(len(plan.items), _MAX_OPEN_POOL))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run_in_loop(coro: Any, use_uvloop: bool) -> Any:
    with asyncio.Runner(loop_factory=_new_loop if use_uvloop else None) as runner:
        return runner.run(coro)
