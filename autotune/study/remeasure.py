"""Re-measure the selected deployment in fresh launches before best.yaml is written.

A trial is one launch measured once; the winner of many such draws is biased upwards (the winner's curse),
and a server's speed varies from launch to launch. So the deployment about to be exported is launched again
`export.remeasure` times, measured exactly as its trial was, and best.yaml records the re-measured median
with its interval (the lowest to the highest interval end over the repeats). A median more than
REPORT_CHANGE away from the trial's value is reported by name, never hidden."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune.report.export import Selection, deployment_config
from autotune.report.ties import interval
from autotune.study.context import StudyContext
from autotune.trial.device_pool import DevicePool
from autotune.trial.runner import run_trial

REPORT_CHANGE = 0.10


@dataclass(frozen=True)
class Remeasure:
    trial: int
    metric: str
    trial_value: float
    values: tuple[float, ...]
    intervals: tuple[tuple[float, float], ...]
    failures: tuple[str, ...]

    @property
    def value(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        return min((lo for lo, _ in self.intervals), default=math.nan)

    @property
    def high(self) -> float:
        return max((hi for _, hi in self.intervals), default=math.nan)

    @property
    def change(self) -> float:
        """Relative change of the re-measured median from the trial's value."""
        if not self.values or self.trial_value == 0:
            return math.nan if not self.values else (0.0 if self.value == 0 else math.inf)
        return self.value / self.trial_value - 1.0

    @property
    def differs(self) -> bool:
        return not self.values or not abs(self.change) <= REPORT_CHANGE

    def describe(self) -> str:
        if not self.values:
            return f"trial #{self.trial} could not be re-measured: {'; '.join(self.failures)}"
        text = (
            f"trial #{self.trial} re-measured in {len(self.values)} fresh launch(es): {self.metric} "
            f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}] against {self.trial_value:.4g} in the trial "
            f"({self.change:+.0%})"
        )
        if self.differs:
            text += f"; DIFFERS from the trial by more than {REPORT_CHANGE:.0%}"
        if self.failures:
            text += f"; {len(self.failures)} launch(es) failed: {'; '.join(self.failures)}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "trial_value": self.trial_value,
            "value": self.value,
            "interval": [self.low, self.high],
            "repeats": list(self.values),
            "change": self.change,
            "differs_from_trial": self.differs,
            "failures": list(self.failures),
            "summary": self.describe(),
        }


def _prefixed(say: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda text: say(prefix + text)


def remeasure(
    ctx: StudyContext,
    selection: Selection,
    repeats: int,
    metric: str,
    on_phase: Callable[[str], None] | None = None,
) -> Remeasure:
    """Launch the selected deployment `repeats` times, one after another, and measure `metric` each time."""
    record = selection.record
    config = deployment_config(record)
    pool = DevicePool(ctx.devices, 1, ctx.settings.trial.server_cpus)
    values: list[float] = []
    spans: list[tuple[float, float]] = []
    failures: list[str] = []
    say = on_phase or print
    for repeat in range(repeats):
        allocation = pool.acquire(config)
        assert allocation is not None  # no cancel event: acquire only returns None when cancelled
        try:
            outcome = run_trial(
                config,
                ctx.traffic,
                ctx.settings.trial,
                ctx.run_dir / "remeasure" / f"{record.number:04d}-{repeat}",
                cpus=list(allocation.cpus),
                extra_env=allocation.env(),
                on_phase=_prefixed(say, f"re-measure {repeat + 1}/{repeats}: "),
            )
        finally:
            pool.release(allocation)
        if outcome.ok and metric in outcome.metrics:
            values.append(float(outcome.metrics[metric]))
            spans.append(interval(outcome.metrics, metric))
        else:
            failures.append(outcome.reason or f"{metric} missing")
    trial_value = float(record.metrics.get(metric, math.nan))
    return Remeasure(record.number, metric, trial_value, tuple(values), tuple(spans), tuple(failures))


def remeasure_cached(
    ctx: StudyContext, selection: Selection, on_phase: Callable[[str], None] | None = None
) -> dict[str, Any] | None:
    """remeasure() once per selected trial and repeat count: a resumed study that selects the same trial
    reads runs/<study>/remeasure/<trial>.json instead of launching again. None when export.remeasure=0."""
    export = ctx.settings.export
    if export.remeasure == 0:
        return None
    metric = ctx.objectives.names[0]
    if export.policy == "max_throughput_within_slo":
        metric = export.throughput_metric
    cache = ctx.run_dir / "remeasure" / f"{selection.record.number:04d}.json"
    if cache.exists():
        stored: dict[str, Any] = json.loads(cache.read_text())
        launches = len(stored.get("repeats", [])) + len(stored.get("failures", []))
        if stored.get("metric") == metric and launches == export.remeasure:
            return stored
    result = remeasure(ctx, selection, export.remeasure, metric, on_phase).as_dict()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result
