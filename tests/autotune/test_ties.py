"""Ties and re-measurement: a difference inside the noise never decides, fresh launches do."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from autotune.config.compose import build_settings, compose_config
from autotune.config.settings import ExportSettings
from autotune.report.export import Selection, select
from autotune.report.objectives import Objectives
from autotune.report.results import TrialRecord
from autotune.report.ties import break_tie, interval, tied_with_best
from autotune.study.context import build_context
from autotune.study.remeasure import Launches, contenders, interleaved, remeasure, reselect
from serving.config import flatten

NAMES = ("capacity_rps_per_device", "p99_ttft_ms", "peak_rss_mb")
DIRECTIONS = ("maximize", "minimize", "minimize")


def rec(number: int, capacity: float, high: float, ttft: float, **deployment: Any) -> TrialRecord:
    metrics = {
        "capacity_rps_per_device": capacity,
        "capacity_rps_bracket_high": high,
        "devices": 1.0,
        "p99_ttft_ms": ttft,
        "peak_rss_mb": 500.0,
        "slo_attainment": 1.0,
    }
    return TrialRecord(number, "COMPLETE", {}, deployment, metrics, (capacity, ttft, 500.0), measured=True)


def capacity_objectives() -> Objectives:
    return Objectives(build_settings(compose_config("chat", [])).objectives)


def test_interval_prefers_the_bootstrap_interval_then_the_capacity_bracket() -> None:
    assert interval(
        {"p99_ttft_ms": 5.0, "p99_ttft_ms_ci95_low": 4.0, "p99_ttft_ms_ci95_high": 7.0}, "p99_ttft_ms"
    ) == (
        4.0,
        7.0,
    )
    per_device = {"capacity_rps_per_device": 2.0, "capacity_rps_bracket_high": 6.0, "devices": 2.0}
    assert interval(per_device, "capacity_rps_per_device") == (2.0, 3.0)
    assert interval({"output_throughput": 9.0}, "output_throughput") == (9.0, 9.0)


def test_overlapping_capacities_tie_and_the_next_objective_breaks_it() -> None:
    records = [rec(0, 4.0, 4.6, 900.0), rec(1, 4.2, 4.8, 300.0), rec(2, 2.0, 2.3, 100.0)]
    tied = tied_with_best(records, "capacity_rps_per_device")
    assert [r.number for r in tied] == [1, 0]  # trial 2's bracket [2.0, 2.3] is clear of the best's
    assert break_tie(tied, NAMES, DIRECTIONS, skip="capacity_rps_per_device").number == 1
    records[1] = rec(1, 4.2, 4.8, 950.0)  # now trial 0 answers faster at the nominal rate
    assert break_tie(tied_with_best(records, NAMES[0]), NAMES, DIRECTIONS, skip=NAMES[0]).number == 0
    chosen = select(records, capacity_objectives(), ExportSettings(throughput_metric=NAMES[0]))
    assert (
        chosen.record.number == 0
        and chosen.tied == (1, 0)
        and "tie broken by p99_ttft_ms" in chosen.explanation
    )


def test_a_clear_winner_is_not_tied() -> None:
    records = [rec(0, 4.0, 4.4, 900.0), rec(1, 6.0, 6.5, 950.0)]
    chosen = select(records, capacity_objectives(), ExportSettings(throughput_metric=NAMES[0]))
    assert chosen.record.number == 1 and chosen.tied == (1,)


def test_contenders_are_the_tied_trials_and_launches_interleave() -> None:
    records = [rec(0, 4.0, 4.6, 900.0), rec(1, 4.2, 4.8, 300.0), rec(2, 4.1, 4.7, 500.0)]
    selection = Selection(records[1], "max_throughput_within_slo", "", (1, 2, 0))
    assert [r.number for r in contenders(selection, records, 1)] == [1, 2]
    assert [r.number for r in contenders(selection, records, 5)] == [1, 2, 0]
    assert interleaved([(1, 3), (2, 1), (0, 1)]) == [1, 2, 0, 1, 1]
    assert interleaved([(1, 0), (2, 1)]) == [2]  # launches already cached are not repeated


def launched(trial: int, *values: float, ttft: float = 500.0) -> Launches:
    return Launches(
        trial,
        [
            {
                "capacity_rps_per_device": v,
                "capacity_rps_bracket_high": v * 1.1,
                "devices": 1.0,
                "p99_ttft_ms": ttft,
            }
            for v in values
        ],
    )


def test_the_selection_is_made_again_on_fresh_launches() -> None:
    records = [rec(0, 4.0, 4.6, 900.0), rec(1, 4.2, 4.8, 300.0)]
    first = Selection(records[1], "max_throughput_within_slo", "first", (1, 0))
    names = (NAMES, DIRECTIONS)
    # trial 1 re-measures well below trial 0, clear of its interval: trial 0 is exported
    again = reselect(first, records, [launched(1, 2.9, 3.0, 3.1), launched(0, 4.1)], NAMES[0], names)
    assert again.record.number == 0 and "#1" in again.explanation
    # the two stay inside each other's intervals: the next objective (re-measured TTFT) decides
    again = reselect(
        first,
        records,
        [launched(1, 4.0, 4.1, 4.2, ttft=300.0), launched(0, 4.1, ttft=800.0)],
        NAMES[0],
        names,
    )
    assert again is first

    # trial 0 re-measures higher but misses the SLO target at the nominal rate now: trial 1 stays
    def meets_slo(metrics: Mapping[str, float]) -> bool:
        return metrics.get("slo_attainment", 1.0) >= 0.9

    missed = launched(0, 4.9)
    missed.metrics[0]["slo_attainment"] = 0.5
    again = reselect(first, records, [launched(1, 2.9, 3.0, 3.1), missed], NAMES[0], names, meets_slo)
    assert again is first
    # every launch of the contender failed: the selection stands
    assert reselect(first, records, [launched(1, 4.0), Launches(0, [], ["died"])], NAMES[0], names) is first


@pytest.mark.slow
def test_remeasure_launches_the_selection_and_its_contender_interleaved_and_caches_them(
    tmp_path: Path,
) -> None:
    overrides = [
        f"study.runs_dir={tmp_path}/runs",
        f"study.reports_dir={tmp_path}/reports",
        "tracking=none",
        "quality.enabled=false",
        "study.name=ties",
        "model=llama-tiny",
        "workload.prefix_len=8",
        "workload.input_len.mean=24",
        "workload.output_len.mean=6",
        "capacity.enabled=false",
        "objectives=throughput_latency",
        "export.throughput_metric=output_throughput",
        "arrival.num_requests=6",
        "arrival.rate=30",
        "arrival.warmup_requests=1",
        "export.remeasure=2",
        "export.contender_repeats=1",
    ]
    ctx = build_context(build_settings(compose_config("chat", overrides)))
    base = flatten(ctx.base.replace(**{"cache.kv_cache_memory_gb": 0.05}).to_dict())
    records = [
        TrialRecord(
            0, "COMPLETE", {}, {**base, "scheduler.policy": "continuous"}, {"output_throughput": 100.0}, None
        ),
        TrialRecord(
            1, "COMPLETE", {}, {**base, "scheduler.policy": "request"}, {"output_throughput": 99.0}, None
        ),
    ]
    selection = Selection(records[0], "max_throughput_within_slo", "first", (0, 1))
    phases: list[str] = []
    result = remeasure(ctx, selection, records, phases.append)
    assert result is not None
    winner = result.selection.record.number  # either may win on fresh launches: 6 requests decide little
    # interleaved; a contender that takes the selection is topped up to export.remeasure launches (and
    # the choice made again, so the first selection may win it back)
    topped = result.order == (0, 1, 0, 1)
    assert result.order == (0, 1, 0) or topped, result.order
    assert topped or winner == 0
    assert any(p.startswith("re-measure 2/3 (#1): ") for p in phases)
    summary = result.as_dict()
    assert summary["metric"] == "output_throughput"
    assert len(summary["repeats"]) + len(summary["failures"]) == 2, "the selection has export.remeasure"
    assert [c["trial"] for c in summary["contenders"]] == [1 - winner]
    cached = json.loads((ctx.run_dir / "remeasure" / "0001.json").read_text())
    assert len(cached["launches"]) + len(cached["failures"]) == (2 if topped else 1)
    again = remeasure(ctx, selection, records, phases.append)  # everything cached: nothing launched
    assert again is not None and again.order == () and again.as_dict()["repeats"] == summary["repeats"]
    assert not psutil.Process().children(recursive=True)
