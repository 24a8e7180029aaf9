"""Run one benchmark: build prompts, align them with the server, warm up, send on schedule, summarise.

The same code serves `autotune bench` and the tuner's trial runner. The timed window runs in this process,
or in client.processes spawned processes that split the schedule (request i goes to process i % N) and share
one start instant on the system-wide perf_counter clock (CLOCK_MONOTONIC), so their records merge exactly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from autotune.traffic.align import AlignmentReport, align_with_server
from autotune.traffic.arrivals import arrival_times
from autotune.traffic.client import HttpClient, make_http_client, new_record, send_request
from autotune.traffic.config import ArrivalConfig, ClientConfig, SLOConfig, WorkloadConfig
from autotune.traffic.display import make_progress, summary_table
from autotune.traffic.metrics import failures_by_reason, summarize
from autotune.traffic.records import RequestRecord
from autotune.traffic.workload import PreparedRequest, make_builder

Tick = Callable[[], None]
_START_MARGIN_S = 0.05
_MAX_OPEN_POOL = 4096


@dataclass
class BenchmarkResult:
    """A finished run: `summary` has vLLM bench-serve key names; failed requests are in records too."""

    summary: dict[str, float | int]
    failures_by_reason: dict[str, int]
    records: list[RequestRecord]
    alignment: AlignmentReport | None = None
    config: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    origin: float = 0.0
    """perf_counter at the benchmark start: record times are relative to it (aligns with server logs)."""


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


def normalize_url(url: str) -> str:
    """The server root: http://host:port (a trailing / or /v1 is dropped)."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


async def discover_model(base_url: str) -> str:
    """The first model the server lists at /v1/models (what vLLM's bench does without --model)."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        response = await http.get(f"{base_url}/v1/models")
        response.raise_for_status()
        models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


async def _send_one(
    plan: ClientPlan,
    http: HttpClient,
    req: PreparedRequest,
    scheduled: float,
    origin: float,
    gate: asyncio.Semaphore | None,
    tick: Tick,
) -> RequestRecord:
    arrived = time.perf_counter()
    record = new_record(req)
    record.process, record.scheduled = plan.process, scheduled
    record.dispatch_lag = max(0.0, arrived - (origin + scheduled))
    if gate is None:
        await send_request(
            http, plan.base_url, plan.model, plan.workload, req, record, plan.client.timeout_s, origin
        )
    else:
        async with gate:
            record.client_queue_time = time.perf_counter() - arrived
            await send_request(
                http, plan.base_url, plan.model, plan.workload, req, record, plan.client.timeout_s, origin
            )
    tick()
    return record


async def run_plan(
    plan: ClientPlan, http: HttpClient, origin: float | None, tick: Tick
) -> tuple[list[RequestRecord], float, float]:
    """Send the plan's requests (open loop on schedule, or closed loop); returns (records, origin, end).

    origin None: now. The HTTP client is made by the caller, before the clock starts (it costs ~20 ms).
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
                out.append(await _send_one(plan, http, req, now - origin, origin, None, tick))
            return out

        per_worker = await asyncio.gather(*(worker() for _ in range(plan.concurrency or 1)))
        records = sorted((r for rs in per_worker for r in rs), key=lambda r: r.index)
    else:
        gate = asyncio.Semaphore(plan.concurrency) if plan.concurrency else None
        tasks = []
        for req, offset in plan.items:
            assert offset is not None  # open-loop plans always carry offsets
            while (delay := origin + offset - time.perf_counter()) > 0:
                await asyncio.sleep(delay)  # loop: timers may fire early (uvloop has 1 ms resolution)
            tasks.append(asyncio.create_task(_send_one(plan, http, req, offset, origin, gate, tick)))
        records = list(await asyncio.gather(*tasks))
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


def _split(plan: ClientPlan, parts: int) -> list[ClientPlan]:
    def share(total: int | None, p: int) -> int | None:
        return None if total is None else max(1, total // parts + (1 if p < total % parts else 0))

    return [
        dataclasses.replace(
            plan, items=plan.items[p::parts], concurrency=share(plan.concurrency, p), process=p
        )
        for p in range(parts)
    ]


def _run_processes(plan: ClientPlan, parts: int, tick: Tick) -> tuple[list[RequestRecord], float, float]:
    """`parts` worker processes (autotune.traffic.worker) on one schedule -> (records, origin, end)."""
    with tempfile.TemporaryDirectory(prefix="autotune-bench-") as tmp:
        procs, outs = [], []
        for part in _split(plan, parts):
            plan_path, out_path = Path(tmp) / f"plan{part.process}.pkl", Path(tmp) / f"out{part.process}.json"
            plan_path.write_bytes(pickle.dumps(part))
            command = [sys.executable, "-m", "autotune.traffic.worker", str(plan_path), str(out_path)]
            procs.append(
                subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
                )
            )
            outs.append(out_path)
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdin is not None  # both are PIPEs
                line = proc.stdout.readline().strip()
                if line != "READY":
                    raise RuntimeError(
                        f"client worker {proc.pid} did not start (exit {proc.wait()}): {line!r}"
                    )
            origin = time.perf_counter() + _START_MARGIN_S
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(f"{origin!r}\n")
                proc.stdin.flush()
            readers = [threading.Thread(target=_follow, args=(proc, tick)) for proc in procs]
            for reader in readers:
                reader.start()
            for reader in readers:
                reader.join()
            codes = [proc.wait() for proc in procs]
            if any(codes):
                raise RuntimeError(f"client worker(s) failed with exit codes {codes}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        results = [json.loads(out.read_text()) for out in outs]
    records = sorted(
        (RequestRecord.from_json(r) for result in results for r in result["records"]), key=lambda r: r.index
    )
    return records, origin, max(result["end"] for result in results)


def _follow(proc: subprocess.Popen[str], tick: Tick) -> None:
    """Relay a worker's per-request ticks to the progress bar until it says DONE (or exits)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("T"):
            tick()
        elif line.startswith("DONE"):
            return


async def _warm_up(base: ClientPlan, requests: Sequence[PreparedRequest]) -> None:
    """Send the warm-up requests (at the run's concurrency) and forget them."""
    if not requests:
        return
    plan = dataclasses.replace(base, items=tuple((r, 0.0) for r in requests), duration_s=None)
    async with http_client_for(plan) as http:
        await run_plan(plan, http, None, lambda: None)


async def prepare(
    base_url: str, model: str, workload: WorkloadConfig, arrival: ArrivalConfig
) -> tuple[list[PreparedRequest], list[PreparedRequest], AlignmentReport | None]:
    """(timed, warm-up, what /tokenize said): prompts are built and aligned before any timing starts."""
    builder = make_builder(workload, model)
    timed = builder.build(arrival.request_count)
    warmup = builder.build(arrival.warmup_requests, warmup=True)
    report = None
    if workload.align_with_server:
        timed, report = await align_with_server(base_url, model, builder, timed)
        if warmup and report.server_tokenize:
            warmup, _ = await align_with_server(base_url, model, builder, warmup)
    return timed, warmup, report


async def run_benchmark_async(
    url: str,
    model: str | None,
    workload: WorkloadConfig,
    arrival: ArrivalConfig,
    *,
    slo: SLOConfig | None = None,
    client: ClientConfig | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> BenchmarkResult:
    """One timed run against an OpenAI-compatible server at `url` (model None: the server's first)."""
    if arrival.sweep is not None:
        raise ValueError("arrival.sweep is set: call run_sweep (one result per sweep point)")
    client = client or ClientConfig()
    base_url = normalize_url(url)
    model = model or await discover_model(base_url)
    timed, warmup, report = await prepare(base_url, model, workload, arrival)
    offsets: list[float | None]
    if arrival.closed:
        offsets = [None] * len(timed)
    else:
        offsets = [float(t) for t in arrival_times(arrival)]
        timed = timed[: len(offsets)]
    plan = ClientPlan(
        base_url,
        model,
        workload,
        client,
        tuple(zip(timed, offsets, strict=True)),
        arrival.concurrency,
        arrival.duration_s,
    )
    await _warm_up(plan, warmup)

    bar = make_progress(console) if progress else None
    task = bar.add_task(f"{workload.name} {arrival.label()}", total=len(timed)) if bar else None

    def tick() -> None:
        if bar is not None and task is not None:
            bar.advance(task)

    if bar is not None:
        bar.start()
    try:
        if client.processes == 1:
            async with http_client_for(plan) as http:
                records, origin, end = await run_plan(plan, http, None, tick)
        else:
            records, origin, end = await asyncio.to_thread(_run_processes, plan, client.processes, tick)
    finally:
        if bar is not None:
            bar.stop()
    summary = summarize(records, end - origin, slo)
    config = {
        "url": base_url,
        "model": model,
        "workload": dataclasses.asdict(workload),
        "arrival": dataclasses.asdict(arrival),
        "slo": dataclasses.asdict(slo or SLOConfig()),
        "client": dataclasses.asdict(client),
    }
    result = BenchmarkResult(summary, failures_by_reason(records), records, report, config, out_dir, origin)
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def run_benchmark(
    url: str,
    model: str | None,
    workload: WorkloadConfig,
    arrival: ArrivalConfig,
    *,
    slo: SLOConfig | None = None,
    client: ClientConfig | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> BenchmarkResult:
    """Synchronous run_benchmark_async (on uvloop when client.uvloop and it is installed)."""
    client = client or ClientConfig()
    coro = run_benchmark_async(
        url,
        model,
        workload,
        arrival,
        slo=slo,
        client=client,
        out_dir=out_dir,
        progress=progress,
        console=console,
    )
    result: BenchmarkResult = run_in_loop(coro, client.uvloop)
    return result


def run_sweep(
    url: str,
    model: str | None,
    workload: WorkloadConfig,
    arrival: ArrivalConfig,
    *,
    slo: SLOConfig | None = None,
    client: ClientConfig | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> list[BenchmarkResult]:
    """One run per sweep point (rates, or concurrencies for a closed loop), each in out_dir/<label>/."""
    results = []
    points = arrival.expand()
    for point in points:
        sub_dir = out_dir if out_dir is None or len(points) == 1 else out_dir / point.label()
        results.append(
            run_benchmark(
                url,
                model,
                workload,
                point,
                slo=slo,
                client=client,
                out_dir=sub_dir,
                progress=progress,
                console=console,
            )
        )
    return results


def write_outputs(result: BenchmarkResult, out_dir: Path) -> None:
    """records.jsonl (one timed request a line) and summary.json (vLLM keys, failures, config, alignment)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "records.jsonl").open("w") as handle:
        for record in result.records:
            handle.write(json.dumps(record.as_json()) + "\n")
    payload: dict[str, Any] = dict(result.summary)
    payload["failures_by_reason"] = result.failures_by_reason
    payload["alignment"] = None if result.alignment is None else dataclasses.asdict(result.alignment)
    payload["config"] = result.config
    (out_dir / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")


def print_summary(
    result: BenchmarkResult, console: Console | None = None, title: str = "Serving benchmark"
) -> None:
    (console or Console()).print(summary_table(result.summary, result.failures_by_reason, title))
