"""The capacity search against scripted servers whose capacity is known, and its statistics.

The scripted server serves `slots` requests at once and queues the rest in arrival order, so with outputs of
n tokens it carries exactly slots / (ttft + (n - 1) * itl) req/s: below that rate TTFT stays at its
scripted value, above it the queue (and TTFT) grows without bound. Constant arrivals make that the known
answer the search must find within 10%."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from autotune.traffic.capacity import find_capacity, ttft_growth
from autotune.traffic.confidence import intervals
from autotune.traffic.config import (
    ArrivalConfig,
    CapacityConfig,
    LengthDistribution,
    SLOConfig,
    WorkloadConfig,
)
from autotune.traffic.metrics import summarize
from autotune.traffic.records import RequestRecord
from serving.config import ConfigError
from tests.fake_server import fake_server

SLOTS, TTFT_MS, ITL_MS, OUT = 2, 20.0, 20.0, 20
KNOWN_RPS = SLOTS / ((TTFT_MS + (OUT - 1) * ITL_MS) / 1000.0)  # 5.0 req/s
WORKLOAD = WorkloadConfig(
    name="t", input_len=LengthDistribution(mean=8), output_len=LengthDistribution(mean=OUT)
)


def test_the_search_finds_a_known_capacity_within_ten_percent(tmp_path: Path) -> None:
    arrival = ArrivalConfig(kind="constant", rate=2.0, num_requests=10)
    settings = CapacityConfig(step_s=3.0, min_requests=15, max_steps=8, tolerance=0.08)
    with fake_server(TTFT_MS, ITL_MS, slots=SLOTS) as url:
        result = asyncio.run(
            find_capacity(
                url, None, WORKLOAD, arrival, SLOConfig(ttft_ms=200), settings=settings, out_dir=tmp_path
            )
        )
    assert abs(result.capacity_rps - KNOWN_RPS) / KNOWN_RPS <= 0.10, result
    assert result.failing_rps is not None and result.failing_rps > result.capacity_rps
    assert result.nominal.carried and result.nominal.rate == 2.0
    overloaded = [s for s in result.steps if s.kind != "probe" and s.rate > 1.2 * KNOWN_RPS]
    assert overloaded and not any(s.carried for s in overloaded)
    saved = json.loads((tmp_path / "capacity.json").read_text())
    assert saved["capacity_rps"] == result.capacity_rps and len(saved["steps"]) == len(result.steps)
    metrics = result.metrics(devices=2)
    assert metrics["capacity_rps_per_device"] == pytest.approx(result.capacity_rps / 2)
    assert metrics["capacity_slo_attainment"] >= 0.9 and metrics["p99_ttft_ms"] < 200


def test_an_overloaded_step_ends_early_and_is_not_carried() -> None:
    """At 3x capacity the misses certain after a moment already rule the target out: the step stops."""
    arrival = ArrivalConfig(kind="constant", rate=3 * KNOWN_RPS, num_requests=10)
    settings = CapacityConfig(step_s=6.0, min_requests=20, max_steps=2, tolerance=0.5)
    with fake_server(TTFT_MS, ITL_MS, slots=SLOTS) as url:
        result = asyncio.run(
            find_capacity(url, None, WORKLOAD, arrival, SLOConfig(ttft_ms=200), settings=settings)
        )
    nominal = result.nominal
    assert not nominal.carried and nominal.stopped_early
    assert nominal.summary["duration"] < 0.5 * settings.step_s
    assert any(r.error_kind == "abandoned" for r in nominal.records)
    assert [s.kind for s in result.steps] == ["probe", "nominal"], "infeasible at nominal: the search ends"
    assert result.capacity_rps == 0.0 and result.failing_rps == arrival.rate


def test_below_nominal_searches_down_from_an_overloaded_nominal_rate() -> None:
    arrival = ArrivalConfig(kind="constant", rate=3 * KNOWN_RPS, num_requests=10)
    settings = CapacityConfig(step_s=2.0, min_requests=20, max_steps=3, tolerance=0.5, below_nominal=True)
    with fake_server(TTFT_MS, ITL_MS, slots=SLOTS) as url:
        result = asyncio.run(
            find_capacity(url, None, WORKLOAD, arrival, SLOConfig(ttft_ms=200), settings=settings)
        )
    assert 0 < result.capacity_rps <= KNOWN_RPS * 1.05 and len(result.steps) >= 3


def test_failed_requests_are_misses() -> None:
    """Every third request answers 500. With a 0.5 target the step runs out and its attainment is 2/3; with
    0.9 the third miss already rules the target out, so the step stops and no rate is carried."""
    arrival = ArrivalConfig(kind="constant", rate=4.0, num_requests=10)
    settings = CapacityConfig(step_s=2.0, min_requests=12, max_steps=2)
    with fake_server(TTFT_MS, ITL_MS, plan="ok,ok,http500") as url:
        lenient, strict = (
            asyncio.run(find_capacity(url, None, WORKLOAD, arrival, slo, settings=settings))
            for slo in (SLOConfig(ttft_ms=500, attainment=0.5), SLOConfig(ttft_ms=500, attainment=0.9))
        )
    assert lenient.nominal.attainment == pytest.approx(2 / 3, abs=0.1) and lenient.nominal.carried
    assert not lenient.nominal.stopped_early
    assert strict.capacity_rps == 0.0 and strict.nominal.stopped_early and not strict.nominal.carried


def _record(index: int, ttft: float, *, success: bool = True, scheduled: float = 0.0) -> RequestRecord:
    return RequestRecord(
        index, 8, 8, 4, scheduled=scheduled, success=success, ttft=ttft, latency=ttft + 0.03,
        output_tokens=4, itl=[0.01, 0.01, 0.01],
    )  # fmt: skip


def test_bootstrap_intervals_cover_a_known_value() -> None:
    """Over many draws from a known distribution, the 95% interval of the median holds the true median
    about 95% of the time (here: at least 85 of 100, a bound a broken interval would not meet)."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(100):
        ttfts = rng.exponential(0.1, size=60)  # true median 0.1 * ln 2
        records = [_record(i, float(t)) for i, t in enumerate(ttfts)]
        ci = intervals(records, SLOConfig(ttft_ms=100), duration_s=10.0, resamples=400, seed=trial)
        covered += ci["median_ttft_ms_ci95_low"] <= 100 * np.log(2) <= ci["median_ttft_ms_ci95_high"]
    assert covered >= 85


def test_attainment_counts_failures_as_misses() -> None:
    records = [_record(0, 0.05), _record(1, 0.5), _record(2, 0.05, success=False)]
    assert summarize(records, 1.0, SLOConfig(ttft_ms=100))["slo_attainment"] == pytest.approx(1 / 3)


def test_ttft_growth_tells_a_growing_queue_from_jitter() -> None:
    rng = np.random.default_rng(0)
    steady = [_record(i, 0.05 + float(rng.normal(0, 0.01)), scheduled=i * 0.1) for i in range(60)]
    growing = [_record(i, 0.05 + 0.2 * i * 0.1, scheduled=i * 0.1) for i in range(60)]
    _, steady_low = ttft_growth(steady, censor_s=1.0)
    estimate, growing_low = ttft_growth(growing, censor_s=1.0)
    assert steady_low <= 0.0 < growing_low and estimate == pytest.approx(0.2, rel=0.1)


def test_capacity_settings_are_checked_by_name() -> None:
    with pytest.raises(ConfigError, match=r"capacity\.min_requests"):
        CapacityConfig(min_requests=50, max_requests=10)
    with pytest.raises(ConfigError, match="unknown key"):
        CapacityConfig.from_config({"step_seconds": 3})
    with pytest.raises(ConfigError, match=r"slo\.attainment"):
        SLOConfig(attainment=1.5)


def test_a_trial_whose_every_request_missed_its_bound_is_measured_as_capacity_zero() -> None:
    """Seen on a summarisation study: every request cut by the search as an SLO miss left nothing
    completed, and the trial failed as broken instead of scoring what it is, a deployment that carries
    nothing. Requests that failed for any other reason still fail it."""
    from autotune.config.settings import TrialSettings
    from autotune.trial.runner import _judge

    settings = TrialSettings()
    all_missed = {"completed": 0, "failed": 0, "slo_misses": 24}
    assert _judge(all_missed, {}, None, settings) is None
    nothing_sent = {"completed": 0, "failed": 0, "slo_misses": 0}
    assert "no request completed" in str(_judge(nothing_sent, {}, None, settings))
    broken = {"completed": 0, "failed": 3, "slo_misses": 21}
    assert "no request completed" in str(_judge(broken, {"http_error": 3}, None, settings))
