"""The front gate: a running trial stops once even its best outcome is dominated by a measured trial."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import optuna
import pytest

from autotune.commands import run as run_command
from autotune.config.compose import build_settings, compose_config
from autotune.report import results as R
from autotune.report.objectives import Objectives
from autotune.report.results import TrialRecord, load_records
from autotune.study.context import build_context
from autotune.study.front_gate import Bounds, dominated_by, front_gate
from autotune.study.storage import open_study
from autotune.traffic.capacity import find_capacity
from autotune.traffic.capacity_result import CapacityResult
from autotune.traffic.config import ArrivalConfig, CapacityConfig, SLOConfig
from serving.config import ConfigError
from tests.autotune.test_capacity import ITL_MS, KNOWN_RPS, SLOTS, TTFT_MS, WORKLOAD
from tests.autotune.test_run_e2e import CAPACITY_FIDELITY, FIXED_LOAD, TINY
from tests.fake_server import fake_server

OBJECTIVES = Objectives(build_settings(compose_config("chat", [])).objectives)
"""The default: capacity_rps_per_device max, p99_ttft_ms (nominal) min, peak_rss_mb min."""


def rival(number: int, capacity: float, ttft: float, rss: float, **metrics: float) -> TrialRecord:
    figures = {
        "capacity_rps_per_device": capacity,
        "p99_ttft_ms": ttft,
        "peak_rss_mb": rss,
        "slo_attainment": 1.0,
        **metrics,
    }
    return TrialRecord(number, "COMPLETE", {}, {}, figures, (capacity, ttft, rss), measured=True)


def bounds(capacity_high: float, ttft: float, rss: float) -> Bounds:
    return {
        "capacity_rps_per_device": (0.5, capacity_high),
        "p99_ttft_ms": (ttft, ttft),
        "peak_rss_mb": (rss, math.inf),
    }


def test_a_trial_whose_best_is_dominated_stops_and_says_by_whom() -> None:
    records = [rival(3, 4.0, 100.0, 500.0)]
    assert dominated_by(bounds(2.0, 150.0, 600.0), records, OBJECTIVES) is records[0]
    reason = front_gate(records, OBJECTIVES)(bounds(2.0, 150.0, 600.0))
    assert reason is not None and "trial #3" in reason and "capacity_rps_per_device 2" in reason


def test_a_trial_better_on_any_one_objective_goes_on() -> None:
    records = [rival(3, 4.0, 100.0, 500.0)]
    gate = front_gate(records, OBJECTIVES)
    assert gate(bounds(4.5, 150.0, 600.0)) is None  # its capacity could still be higher
    assert gate(bounds(2.0, 90.0, 600.0)) is None  # it answers faster at the nominal rate
    assert gate(bounds(2.0, 150.0, 450.0)) is None  # it holds less memory


def test_the_rivals_intervals_are_read_at_their_worst_end() -> None:
    """The rival's p99 TTFT interval reaches 160 ms: not clearly better than 150 ms, so no pruning."""
    noisy = rival(3, 4.0, 100.0, 500.0, p99_ttft_ms_ci95_low=80.0, p99_ttft_ms_ci95_high=160.0)
    assert dominated_by(bounds(2.0, 150.0, 600.0), [noisy], OBJECTIVES) is None


def test_infeasible_rivals_and_unbounded_objectives_never_prune() -> None:
    infeasible = rival(3, 4.0, 100.0, 500.0, slo_attainment=0.5)
    infeasible.constraints["slo_attainment"] = 0.4  # Optuna's form: > 0 violates the bound
    assert dominated_by(bounds(2.0, 150.0, 600.0), [infeasible], OBJECTIVES) is None
    unbounded = dict(bounds(2.0, 150.0, 600.0))
    del unbounded["peak_rss_mb"]
    assert dominated_by(unbounded, [rival(3, 4.0, 100.0, 500.0)], OBJECTIVES) is None


def test_the_margin_is_checked_by_name() -> None:
    with pytest.raises(ConfigError, match=r"capacity\.prune_margin"):
        CapacityConfig(prune_margin=0.5)


def test_a_gated_search_ends_after_the_nominal_step_with_its_bounds(tmp_path: Path) -> None:
    """The scripted server carries 5 req/s; the gate sees the bounds and stops the search at once."""
    arrival = ArrivalConfig(kind="constant", rate=2.0, num_requests=10)
    settings = CapacityConfig(step_s=2.0, min_requests=8, max_steps=4, prune_margin=2.0)
    seen: list[dict[str, tuple[float, float]]] = []

    def gate(partial: CapacityResult) -> str | None:
        seen.append(partial.bounds(devices=2, margin=settings.prune_margin))
        return "dominated (test)"

    with fake_server(TTFT_MS, ITL_MS, slots=SLOTS) as url:
        result = asyncio.run(
            find_capacity(
                url,
                None,
                WORKLOAD,
                arrival,
                SLOConfig(ttft_ms=200),
                settings=settings,
                out_dir=tmp_path,
                gate=gate,
            )
        )
    assert [s.kind for s in result.steps] == ["probe", "nominal"] and result.stopped_by == "dominated (test)"
    (seen_bounds,) = seen
    low, high = seen_bounds["capacity_rps_per_device"]
    assert low == pytest.approx(1.0) and high == pytest.approx(2.0 * result.probe_rps / 2)
    assert high >= KNOWN_RPS / 2, "the ceiling must not be below the true capacity per device"
    ttft_low, ttft_high = seen_bounds["p99_ttft_ms"]
    assert ttft_low <= result.nominal.summary["p99_ttft_ms"] <= ttft_high
    assert json.loads((tmp_path / "capacity.json").read_text())["stopped_by"] == "dominated (test)"


@pytest.mark.slow
def test_a_study_prunes_a_launched_trial_that_a_measured_one_dominates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study already holds a trial better on every objective than anything llama-tiny can do here: the
    next trial is launched, stops after its nominal step, and is recorded PRUNED with its figures."""
    space = tmp_path / "space.yaml"
    space.write_text(
        "seeds:\n  - {scheduler.policy: continuous}\n"
        "dimensions:\n  scheduler.policy: {type: categorical, choices: [request, continuous]}\n"
    )
    args = [
        "conf=chat",
        *[a for a in TINY if a not in FIXED_LOAD and not a.startswith(("arrival.", "study.name"))],
        *CAPACITY_FIDELITY,
        "study.name=gate",
        "study.n_trials=2",
        "export.remeasure=0",
        "tracking=none",
        "quality.enabled=false",
        f"search.space={space}",
    ]
    monkeypatch.chdir(tmp_path)
    ctx = build_context(build_settings(compose_config("chat", args[1:])))
    study = open_study(ctx)
    best = {"capacity_rps_per_device": 1e6, "p99_ttft_ms": 1e-3, "peak_rss_mb": 1.0, "slo_attainment": 1.0}
    study.add_trial(
        optuna.trial.create_trial(
            values=[best[n] for n in ctx.objectives.names],
            user_attrs={R.MEASURED: True, R.METRICS: best},
            system_attrs={"constraints": [0.0]},
        )
    )
    assert run_command.main(args) == 0
    record = load_records(open_study(ctx))[1]
    assert record.state == "PRUNED" and record.measured, record
    assert record.reason is not None and "cannot reach the front" in record.reason and "#0" in record.reason
    assert {"p99_ttft_ms", "capacity_rps", "peak_rss_mb"} <= set(record.metrics)
    saved = json.loads((tmp_path / "runs/gate/trials/0001/capacity.json").read_text())
    assert [s["kind"] for s in saved["steps"]] == ["probe", "nominal"] and saved[
        "stopped_by"
    ] == record.reason
    assert len(load_records(open_study(ctx))) == 2, "the pruned trial counted against study.n_trials"
