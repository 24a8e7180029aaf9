"""Capacity under SLO: the highest open-loop request rate a server carries with SLO attainment >= target.

The question a deployment is bought to answer (DistServe's per-GPU goodput, vLLM auto_tune's rate search)
is not what it does at one fixed load but how much load it takes before the SLOs break. The search:
1. a probe: one closed wave of `probe_concurrency` requests; its completion rate bounds the scale;
2. a step at the user's nominal rate (`arrival.rate`): the latencies users will see, and a first bracket;
3. geometric steps (first jumping near the probe's rate) until a rate fails, then bisection on the log
   scale until the failing rate is within `tolerance` of the carried one.
Each step is open loop with the study's arrival shape for `step_s` seconds. A rate is carried when the
attainment (every request, failed ones as misses) reaches the target *and* the TTFT trend, projected
`sustain_s` seconds on, stays within the TTFT SLO: a short step otherwise crowns an overloaded server,
whose queue simply had no time to grow. A step ends early once the misses already certain (answered late,
failed, or waiting past their TTFT or end-to-end bound) make the target unreachable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from autotune.traffic.align import align_with_server
from autotune.traffic.arrivals import arrival_times
from autotune.traffic.capacity_result import CAPACITY_FILE, CapacityResult, LoadStep
from autotune.traffic.client import OnChunk
from autotune.traffic.confidence import RESAMPLES, intervals
from autotune.traffic.config import ArrivalConfig, CapacityConfig, ClientConfig, SLOConfig, WorkloadConfig
from autotune.traffic.metrics import is_good, summarize
from autotune.traffic.records import RequestRecord, write_records
from autotune.traffic.schedule import ClientPlan, http_client_for, run_plan
from autotune.traffic.workload import PreparedRequest, PromptBuilder, make_builder

MONITOR_S = 0.25
MIN_RATE_DIVISOR = 16
"""The search goes no lower than nominal / 16: a deployment that does not carry that has capacity 0."""
DEFAULT_PROBE_CONCURRENCY = 32
MISS_BOUND_GRACE = 1.2
"""A request waits this many times its miss bound (plus a second) before the client gives up on it."""


class _Requests:
    """Fresh prompts for every step (request i depends only on the seed and i), aligned with the server."""

    def __init__(self, base_url: str, model: str, workload: WorkloadConfig) -> None:
        self.base_url, self.model, self.workload = base_url, model, workload
        self.builder: PromptBuilder = make_builder(workload, model)
        self.next_index = 0

    async def take(self, count: int) -> list[PreparedRequest]:
        first, self.next_index = self.next_index, self.next_index + count
        batch = [self.builder.build_one(i) for i in range(first, first + count)]
        if self.workload.align_with_server:
            batch, _ = await align_with_server(self.base_url, self.model, self.builder, batch)
        return batch


def ttft_growth(records: Sequence[RequestRecord], censor_s: float, seed: int = 0) -> tuple[float, float]:
    """(estimate, lower 95% bound) of the TTFT gained per second of schedule.

    The later half's median TTFT minus the earlier half's, over the gap between them; the bound comes from
    resampling each half (bootstrap), so jitter is not read as a growing queue. A failed request counts with
    TTFT `censor_s` (it waited at least that long): requests timing out in a growing queue do not hide it."""
    points = sorted((r.scheduled, r.ttft if r.success else censor_s) for r in records)
    if len(points) < 8:
        return 0.0, 0.0
    half = len(points) // 2
    early, late = np.array(points[:half]), np.array(points[half:])
    gap = float(np.median(late[:, 0]) - np.median(early[:, 0]))
    if gap <= 0:
        return 0.0, 0.0
    estimate = float(np.median(late[:, 1]) - np.median(early[:, 1])) / gap
    rng = np.random.default_rng(seed)
    early_medians = np.median(rng.choice(early[:, 1], size=(RESAMPLES, len(early))), axis=1)
    late_medians = np.median(rng.choice(late[:, 1], size=(RESAMPLES, len(late))), axis=1)
    low = float(np.percentile((late_medians - early_medians) / gap, 2.5))
    return estimate, low


def _certain_misses(
    live: Sequence[RequestRecord], age_s: float, slo: SLOConfig, bound_s: float | None
) -> int:
    """Requests that can no longer meet the SLOs: answered late, failed, or waiting past a bound."""
    goals = slo.as_dict()
    ttft_s = None if slo.ttft_ms is None else slo.ttft_ms / 1000.0
    misses = 0
    for r in live:
        if r.success or r.error_kind is not None:
            misses += not (r.success and is_good(r, goals))
            continue
        waited = age_s - r.scheduled
        if (ttft_s is not None and r.ttft == 0.0 and waited > ttft_s) or (
            bound_s is not None and waited > bound_s
        ):
            misses += 1
    return misses


class CapacitySearch:
    """Runs the probe and the load steps against one server (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        workload: WorkloadConfig,
        arrival: ArrivalConfig,
        slo: SLOConfig,
        client: ClientConfig,
        settings: CapacityConfig,
        *,
        probe_concurrency: int | None = None,
        out_dir: Path | None = None,
        on_step: Callable[[LoadStep], None] | None = None,
        on_chunk: OnChunk = None,
        gate: Callable[[CapacityResult], str | None] | None = None,
    ) -> None:
        settings.check_traffic(arrival, slo)
        self.base_url, self.model, self.workload = base_url, model, workload
        self.arrival, self.slo, self.client, self.settings = arrival, slo, client, settings
        self.probe_concurrency = settings.probe_concurrency or probe_concurrency or DEFAULT_PROBE_CONCURRENCY
        self.out_dir, self.on_step = out_dir, on_step or (lambda _: None)
        self.on_chunk = on_chunk
        """Called per token received (the trial's hang watch counts them)."""
        self.gate = gate
        """Asked once the nominal rate is carried, with the result so far: a reason ends the search."""
        self.requests = _Requests(base_url, model, workload)
        self.steps: list[LoadStep] = []

    async def run(self) -> CapacityResult:
        await self._warm_up()
        probe = await self._step("probe", 0.0)
        probe_rps = probe.summary["request_throughput"]
        nominal = self.arrival.rate
        carried, failing = 0.0, math.inf
        stopped_by: str | None = None
        rate = nominal
        for index in range(self.settings.max_steps):
            step = await self._step("nominal" if index == 0 else "search", rate)
            if step.carried:
                carried = max(carried, rate)
            else:
                failing = min(failing, rate)
            if index == 0 and not step.carried and not self.settings.below_nominal:
                break  # infeasible at the nominal rate: the cheap first fidelity ends the search
            if index == 0 and self.gate is not None:
                so_far = CapacityResult(self.slo.attainment, probe_rps, self.steps, carried, None)
                stopped_by = self.gate(so_far)
                if stopped_by is not None:
                    break  # even its best possible capacity cannot put it on the front
            if carried > 0 and failing / carried <= 1.0 + self.settings.tolerance:
                break
            rate = self._next_rate(rate, carried, failing, probe_rps, first=index == 0)
            if rate < nominal / MIN_RATE_DIVISOR:
                break
        return CapacityResult(
            self.slo.attainment,
            probe_rps,
            self.steps,
            carried,
            None if math.isinf(failing) else failing,
            stopped_by,
        )

    @staticmethod
    def _next_rate(rate: float, carried: float, failing: float, probe_rps: float, *, first: bool) -> float:
        """Geometric until bracketed (the first move jumps near the probe's rate), then the log midpoint."""
        near_probe = 0.9 * probe_rps
        if math.isinf(failing):
            return max(rate * 1.5, near_probe) if first else rate * 2.0
        if carried == 0.0:
            return min(rate / 2.0, near_probe) if first and near_probe > 0 else rate / 2.0
        return math.sqrt(carried * failing)

    def _step_size(self, rate: float) -> int:
        """rate x step_s requests, raised towards min_requests only as far as 3 x step_s of arrivals allow
        (a slow rate is an unloaded server: fewer requests suffice, and waiting for more costs minutes)."""
        settings = self.settings
        floor = min(settings.min_requests, math.ceil(rate * 3 * settings.step_s))
        return max(1, min(max(math.ceil(rate * settings.step_s), floor), settings.max_requests))

    async def _warm_up(self) -> None:
        count = self.arrival.warmup_requests
        if count:
            warm = [self.requests.builder.build_one(i, stream=1) for i in range(count)]
            plan = self._plan([(r, None) for r in warm], concurrency=count, timeout_s=self.client.timeout_s)
            async with http_client_for(plan) as http:
                await run_plan(plan, http, None, lambda: None, self.on_chunk)

    def _plan(
        self,
        items: list[tuple[PreparedRequest, float | None]],
        *,
        concurrency: int | None,
        timeout_s: float,
        watch: Callable[[RequestRecord], None] | None = None,
    ) -> ClientPlan:
        client = dataclasses.replace(self.client, timeout_s=timeout_s)
        return ClientPlan(
            self.base_url, self.model, self.workload, client, tuple(items), concurrency, None, watch=watch
        )

    async def _step(self, kind: str, rate: float) -> LoadStep:
        if kind == "probe":
            count = self.probe_concurrency
            batch = await self.requests.take(count)
            items: list[tuple[PreparedRequest, float | None]] = [(r, None) for r in batch]
            concurrency: int | None = count
            timeout_s = self.settings.probe_timeout_s
            bound_s = None
        else:
            count = self._step_size(rate)
            shape = dataclasses.replace(
                self.arrival, rate=rate, num_requests=count, duration_s=None, sweep=None
            )
            batch = await self.requests.take(count)
            items = list(zip(batch, (float(t) for t in arrival_times(shape)), strict=True))
            concurrency = self.arrival.concurrency
            longest = max(r.output_len for r in batch)
            miss = self.slo.miss_bound_s(longest)
            bound_s = miss
            timeout_s = (
                self.client.timeout_s
                if miss is None
                else min(self.client.timeout_s, miss * MISS_BOUND_GRACE + 1.0)
            )
        records, duration, stopped = await self._send(items, concurrency, timeout_s, bound_s, kind != "probe")
        step = self._judge(kind, rate, count, records, duration, stopped, timeout_s)
        self.steps.append(step)
        self._write(step)
        self.on_step(step)
        return step

    async def _send(
        self,
        items: list[tuple[PreparedRequest, float | None]],
        concurrency: int | None,
        timeout_s: float,
        bound_s: float | None,
        may_stop: bool,
    ) -> tuple[list[RequestRecord], float, bool]:
        """Send on schedule; stop at once when the misses already certain exceed the step's allowance."""
        live: list[RequestRecord] = []
        plan = self._plan(items, concurrency=concurrency, timeout_s=timeout_s, watch=live.append)
        allowed = math.floor((1.0 - self.slo.attainment) * len(items) + 1e-9)
        stopped = False
        async with http_client_for(plan) as http:
            started = time.perf_counter()
            task = asyncio.ensure_future(run_plan(plan, http, started, lambda: None, self.on_chunk))
            while not task.done():
                await asyncio.wait({task}, timeout=MONITOR_S)
                age = time.perf_counter() - started
                if may_stop and not task.done() and _certain_misses(live, age, self.slo, bound_s) > allowed:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    stopped = True
            if not stopped:
                records, _, end = task.result()
                return records, end - started, False
        for r in live:
            if not (r.success or r.error_kind is not None):
                r.error_kind, r.error = (
                    "abandoned",
                    "the load step stopped early: the SLO target was out of reach",
                )
                r.itl, r.ttft, r.latency = [], 0.0, 0.0
        return sorted(live, key=lambda r: r.index), time.perf_counter() - started, True

    def _judge(
        self,
        kind: str,
        rate: float,
        planned: int,
        records: list[RequestRecord],
        duration: float,
        stopped: bool,
        timeout_s: float,
    ) -> LoadStep:
        summary: dict[str, float] = {k: float(v) for k, v in summarize(records, duration, self.slo).items()}
        share = summary["slo_attainment"] * len(records) / planned if planned else 0.0
        summary["slo_attainment"] = share
        summary["offered_rps"] = rate
        summary |= intervals(records, self.slo, duration)
        growth, growth_low = ttft_growth(records, timeout_s)
        summary["ttft_growth_s_per_s"] = growth
        summary["ttft_growth_s_per_s_ci95_low"] = growth_low
        ttft_slo = None if self.slo.ttft_ms is None else self.slo.ttft_ms / 1000.0
        late = [r.ttft for r in sorted(records, key=lambda r: r.scheduled)[len(records) // 2 :] if r.success]
        trend_s = max(growth_low, 0.0) * self.settings.sustain_s  # jitter is not read as a growing queue
        projected = (float(np.median(late)) if late else math.inf) + trend_s
        sustained = ttft_slo is None or projected <= ttft_slo
        carried = kind != "probe" and not stopped and share >= self.slo.attainment and sustained
        return LoadStep(kind, rate, planned, share, carried, growth, growth_low, stopped, summary, records)

    def _write(self, step: LoadStep) -> None:
        if self.out_dir is None:
            return
        step_dir = self.out_dir / "steps" / f"{len(self.steps):02d}_{step.label}"
        write_records(step.records, step_dir / "records.jsonl")
        (step_dir / "summary.json").write_text(json.dumps(step.as_json(), indent=2) + "\n")


async def find_capacity(
    url: str,
    model: str | None,
    workload: WorkloadConfig,
    arrival: ArrivalConfig,
    slo: SLOConfig,
    *,
    client: ClientConfig | None = None,
    settings: CapacityConfig | None = None,
    probe_concurrency: int | None = None,
    out_dir: Path | None = None,
    on_step: Callable[[LoadStep], None] | None = None,
    on_chunk: OnChunk = None,
    gate: Callable[[CapacityResult], str | None] | None = None,
) -> CapacityResult:
    """The capacity search against an OpenAI-compatible server at `url` (model None: its first)."""
    from autotune.traffic.runner import discover_model, normalize_url

    base_url = normalize_url(url)
    search = CapacitySearch(
        base_url,
        model or await discover_model(base_url),
        workload,
        arrival,
        slo,
        client or ClientConfig(),
        settings or CapacityConfig(),
        probe_concurrency=probe_concurrency,
        out_dir=out_dir,
        on_step=on_step,
        on_chunk=on_chunk,
        gate=gate,
    )
    result = await search.run()
    if out_dir is not None:
        payload = {
            "target": result.target,
            "probe_rps": result.probe_rps,
            "capacity_rps": result.capacity_rps,
            "failing_rps": result.failing_rps,
            "stopped_by": result.stopped_by,
            "steps": [s.as_json() for s in result.steps],
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CAPACITY_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return result
