"""Re-measure the selection and its contenders in fresh launches before best.yaml is written.

A trial is one launch measured once; the winner of many such draws is biased upwards (the winner's curse),
and a server's speed varies from launch to launch. So the deployment about to be exported is launched again
`export.remeasure` times, and so are its contenders, the trials tied with it on the deciding metric
(`export.remeasure_contenders` of them, `export.contender_repeats` launches each), the launches
interleaved in time so drift in the machine falls on all of them alike. Each is measured exactly as its
trial was. The selection is then made again on the re-measured medians: the best median wins unless its
interval overlaps another's, and a tie is broken by the next objective, as at selection. best.yaml records
the winner's re-measured median with its interval (the lowest to the highest interval end over its
repeats); a median more than REPORT_CHANGE away from the trial's value is reported by name, never hidden.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.report.export import Selection, deployment_config
from autotune.report.results import TrialRecord
from autotune.report.ties import break_tie, interval, overlaps
from autotune.study.context import StudyContext
from autotune.trial.device_pool import DevicePool
from autotune.trial.runner import run_trial

REPORT_CHANGE = 0.10


@dataclass
class Launches:
    """One trial's re-measure launches: per launch, its metrics (or why it failed)."""

    trial: int
    metrics: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.metrics) + len(self.failures)

    def median(self, metric: str) -> float:
        values = [m[metric] for m in self.metrics if metric in m]
        return statistics.median(values) if values else math.nan

    def span(self, metric: str) -> tuple[float, float]:
        """The lowest to the highest interval end over the launches that measured `metric`."""
        spans = [interval(m, metric) for m in self.metrics if metric in m]
        if not spans:
            return math.nan, math.nan
        return min(lo for lo, _ in spans), max(hi for _, hi in spans)

    @classmethod
    def read(cls, path: Path, trial: int) -> Launches:
        if not path.exists():
            return cls(trial)
        stored = json.loads(path.read_text())
        return cls(trial, list(stored.get("launches", [])), list(stored.get("failures", [])))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"launches": self.metrics, "failures": self.failures}, indent=2) + "\n")


@dataclass(frozen=True)
class Remeasure:
    """The re-measured candidates and the selection made again on their medians."""

    metric: str
    selection: Selection
    """The final selection (its record's metrics are the trial's own, as measured in the study)."""
    first: int
    """The trial selected before re-measuring."""
    candidates: tuple[Launches, ...]
    trial_values: dict[int, float]
    order: tuple[int, ...]
    """The trials in the order their launches ran."""

    def of(self, trial: int) -> Launches:
        return next(c for c in self.candidates if c.trial == trial)

    @property
    def winner(self) -> Launches:
        return self.of(self.selection.record.number)

    @property
    def change(self) -> float:
        """Relative change of the winner's re-measured median from its trial's value."""
        value, before = self.winner.median(self.metric), self.trial_values[self.winner.trial]
        if math.isnan(value) or before == 0:
            return value if math.isnan(value) else (0.0 if value == 0 else math.inf)
        return value / before - 1.0

    @property
    def differs(self) -> bool:
        return not abs(self.change) <= REPORT_CHANGE

    def describe(self) -> str:
        won = self.winner
        if not won.metrics:
            return f"trial #{won.trial} could not be re-measured: {'; '.join(won.failures)}"
        low, high = won.span(self.metric)
        text = (
            f"trial #{won.trial} re-measured in {len(won.metrics)} fresh launch(es): {self.metric} "
            f"{won.median(self.metric):.4g} [{low:.4g}, {high:.4g}] against "
            f"{self.trial_values[won.trial]:.4g} in the trial ({self.change:+.0%})"
        )
        if self.differs:
            text += f"; DIFFERS from the trial by more than {REPORT_CHANGE:.0%}"
        others = [c for c in self.candidates if c.trial != won.trial]
        if others:
            text += "; contenders " + ", ".join(
                f"#{c.trial} {c.median(self.metric):.4g}" if c.metrics else f"#{c.trial} failed"
                for c in others
            )
        if self.first != won.trial:
            text += f"; the re-measure changed the selection from trial #{self.first}"
        failed = sum(len(c.failures) for c in self.candidates)
        if failed:
            reasons = "; ".join(f for c in self.candidates for f in c.failures)
            text += f"; {failed} launch(es) failed: {reasons}"
        return text

    def as_dict(self) -> dict[str, Any]:
        won = self.winner

        def entry(c: Launches) -> dict[str, Any]:
            return {
                "trial": c.trial,
                "trial_value": self.trial_values[c.trial],
                "value": c.median(self.metric),
                "interval": list(c.span(self.metric)),
                "repeats": [m[self.metric] for m in c.metrics if self.metric in m],
                "failures": list(c.failures),
            }

        return {
            "metric": self.metric,
            **{k: v for k, v in entry(won).items() if k != "trial"},
            "change": self.change,
            "differs_from_trial": self.differs,
            "selection_changed_from": self.first if self.first != won.trial else None,
            "contenders": [entry(c) for c in self.candidates if c.trial != won.trial],
            "order": list(self.order),
            "summary": self.describe(),
        }


def contenders(selection: Selection, records: Sequence[TrialRecord], limit: int) -> list[TrialRecord]:
    """The selected trial, then up to `limit` of the trials tied with it (best first, as `tied` lists)."""
    by_number = {r.number: r for r in records}
    tied = [by_number[n] for n in selection.tied if n != selection.record.number and n in by_number]
    return [selection.record, *tied[:limit]]


def interleaved(needs: Sequence[tuple[int, int]]) -> list[int]:
    """Launch order for (trial, launches still needed): round by round, every trial that needs one."""
    rounds = max((n for _, n in needs), default=0)
    return [trial for r in range(rounds) for trial, n in needs if r < n]


def reselect(
    first: Selection,
    candidates: Sequence[TrialRecord],
    launches: Sequence[Launches],
    metric: str,
    objectives: tuple[Sequence[str], Sequence[str]],
    feasible: Callable[[Mapping[str, float]], bool] = lambda _: True,
) -> Selection:
    """The selection made again on the re-measured medians of every candidate that measured `metric` and
    still meets the constraints (`feasible`); `objectives` (names, directions) break a tie, as at
    selection."""
    medians = {
        c.trial: {k: c.median(k) for k in {k for m in c.metrics for k in m}} for c in launches if c.metrics
    }
    measured = [dataclasses.replace(r, metrics=medians[r.number]) for r in candidates if r.number in medians]
    measured = [r for r in measured if not math.isnan(r.metrics.get(metric, math.nan))]
    measured = [r for r in measured if feasible(r.metrics)]
    if not measured or len(candidates) == 1:
        return first
    spans = {c.trial: c.span(metric) for c in launches}
    best = max(measured, key=lambda r: (r.metrics[metric], -r.number))
    tied = [r for r in measured if r is best or overlaps(spans[r.number], spans[best.number])]
    chosen = break_tie(tied, *objectives, skip=metric)
    record = next(r for r in candidates if r.number == chosen.number)
    if record is first.record:
        return first
    why = (
        f"re-measured in fresh launches, trial #{chosen.number} carried the higher {metric} "
        f"({chosen.metrics[metric]:.4g} against #{first.record.number}'s "
        f"{medians.get(first.record.number, {}).get(metric, math.nan):.4g})"
    )
    if len(tied) > 1:
        why = f"re-measured in fresh launches, tied on {metric}; the tie broken by the next objective"
    return Selection(record, first.policy, why, tuple(r.number for r in tied))


def _prefixed(say: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda text: say(prefix + text)


def _metric(ctx: StudyContext) -> str:
    export = ctx.settings.export
    if export.policy == "max_throughput_within_slo":
        return export.throughput_metric
    return ctx.objectives.names[0]


def remeasure(
    ctx: StudyContext,
    selection: Selection,
    records: Sequence[TrialRecord],
    on_phase: Callable[[str], None] | None = None,
) -> Remeasure | None:
    """Launch the selection and its contenders, interleaved, reusing launches cached in
    runs/<study>/remeasure/NNNN.json (a resumed study or `autotune export` does not launch them again).
    None when export.remeasure=0."""
    export = ctx.settings.export
    if export.remeasure == 0:
        return None
    metric = _metric(ctx)
    candidates = contenders(selection, records, export.remeasure_contenders)
    wanted = {r.number: export.contender_repeats for r in candidates}
    wanted[selection.record.number] = export.remeasure
    paths = {n: ctx.run_dir / "remeasure" / f"{n:04d}.json" for n in wanted}
    launches = {n: Launches.read(paths[n], n) for n in wanted}
    order = interleaved([(n, max(0, wanted[n] - launches[n].count)) for n in wanted])
    pool = DevicePool(ctx.devices, 1, ctx.settings.trial.server_cpus)
    say = on_phase or print
    ran: list[int] = []

    def launch(trial: int, label: str) -> None:
        config = deployment_config(next(r for r in candidates if r.number == trial))
        allocation = pool.acquire(config)
        assert allocation is not None  # no cancel event: acquire only returns None when cancelled
        try:
            outcome = run_trial(
                config,
                ctx.traffic,
                ctx.settings.trial,
                ctx.run_dir / "remeasure" / f"{trial:04d}-{launches[trial].count}",
                cpus=list(allocation.cpus),
                extra_env=allocation.env(),
                on_phase=_prefixed(say, f"re-measure {label} (#{trial}): "),
            )
        finally:
            pool.release(allocation)
        if outcome.ok and metric in outcome.metrics:
            launches[trial].metrics.append({k: float(v) for k, v in outcome.metrics.items()})
        else:
            launches[trial].failures.append(outcome.reason or f"{metric} missing")
        launches[trial].write(paths[trial])
        ran.append(trial)

    for step, trial in enumerate(order, start=1):
        launch(trial, f"{step}/{len(order)}")
    names = (ctx.objectives.names, ctx.objectives.directions)

    ordered = tuple(launches[r.number] for r in candidates)
    final = reselect(selection, candidates, ordered, metric, names, ctx.objectives.meets_measured_bounds)
    # A contender that took the selection on its few launches is topped up to export.remeasure and the
    # choice made again; each candidate is topped up at most once, so this ends.
    while launches[final.record.number].count < export.remeasure:
        winner = final.record.number
        for extra in range(export.remeasure - launches[winner].count):
            launch(winner, f"of the new selection {extra + 1}")
        final = reselect(selection, candidates, ordered, metric, names, ctx.objectives.meets_measured_bounds)
    values = {r.number: float(r.metrics.get(metric, math.nan)) for r in candidates}
    return Remeasure(metric, final, selection.record.number, ordered, values, tuple(ran))


def remeasure_selection(
    ctx: StudyContext,
    selection: Selection,
    records: Sequence[TrialRecord],
    on_phase: Callable[[str], None] | None = None,
) -> tuple[Selection, dict[str, Any]] | None:
    """remeasure() as the report and best.yaml take it: the final selection and its summary."""
    result = remeasure(ctx, selection, records, on_phase)
    return None if result is None else (result.selection, result.as_dict())
