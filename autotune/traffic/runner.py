"""Run one benchmark: build prompts, align them with the server, warm up, send on schedule, summarise.

The same code serves `autotune bench` and the tuner's trial runner. The timed window runs in this process
(schedule.py) or in client.processes worker processes (processes.py)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from autotune.traffic.align import AlignmentReport, align_with_server
from autotune.traffic.arrivals import arrival_times
from autotune.traffic.client import OnChunk
from autotune.traffic.confidence import intervals
from autotune.traffic.config import ArrivalConfig, ClientConfig, SLOConfig, WorkloadConfig
from autotune.traffic.display import make_progress, summary_table
from autotune.traffic.metrics import failures_by_reason, summarize
from autotune.traffic.processes import run_processes_async
from autotune.traffic.records import RequestRecord, write_records
from autotune.traffic.schedule import ClientPlan, http_client_for, run_in_loop, run_plan
from autotune.traffic.workload import PreparedRequest, make_builder


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


async def _warm_up(base: ClientPlan, requests: Sequence[PreparedRequest], on_chunk: OnChunk) -> None:
    """Send the warm-up requests (at the run's concurrency) and forget them."""
    if not requests:
        return
    plan = dataclasses.replace(base, items=tuple((r, 0.0) for r in requests), duration_s=None)
    async with http_client_for(plan) as http:
        await run_plan(plan, http, None, lambda: None, on_chunk)


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
    on_chunk: OnChunk = None,
) -> BenchmarkResult:
    """One timed run against an OpenAI-compatible server at `url` (model None: the server's first).

    `on_chunk` is called per token received, warm-up included (with client.processes > 1: at most every
    worker.CHUNK_REPORT_S per worker), for a watch that tells a slow server from a hung one.
    """
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
    await _warm_up(plan, warmup, on_chunk)

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
                records, origin, end = await run_plan(plan, http, None, tick, on_chunk)
        else:
            records, origin, end = await run_processes_async(plan, client.processes, tick, on_chunk)
    finally:
        if bar is not None:
            bar.stop()
    summary = summarize(records, end - origin, slo)
    summary |= intervals(records, slo, end - origin)
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
    write_records(result.records, out_dir / "records.jsonl")
    payload: dict[str, Any] = dict(result.summary)
    payload["failures_by_reason"] = result.failures_by_reason
    payload["alignment"] = None if result.alignment is None else dataclasses.asdict(result.alignment)
    payload["config"] = result.config
    (out_dir / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")


def print_summary(
    result: BenchmarkResult, console: Console | None = None, title: str = "Serving benchmark"
) -> None:
    (console or Console()).print(summary_table(result.summary, result.failures_by_reason, title))
