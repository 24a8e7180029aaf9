"""The front gate: a trial stops early once even its best possible outcome could not reach the front.

A capacity search spends most of a trial's minutes bracketing the capacity after its probe and nominal
step. By then every objective already has a bound: the nominal step's latencies have their 95% intervals,
memory only grows from its peak so far, and the capacity cannot be far above the probe's closed-loop rate
(`capacity.prune_margin` times it). When a completed, feasible trial is at least as good as the most this
one could still reach on every objective, and better on one, the rest of the search cannot put it on the
front: it ends as PRUNED with the reason (Optuna's successive-halving idea, made sound by using the
optimistic end of every bound and the pessimistic end of the rival's interval).
An objective with no bound yet (a quality metric, say) means no pruning."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from autotune.report.objectives import Objectives
from autotune.report.pareto import candidates
from autotune.report.results import TrialRecord
from autotune.report.ties import interval

Bounds = Mapping[str, tuple[float, float]]
"""metric -> (lowest, highest) value the trial can still end with."""
Gate = Callable[[Bounds], "str | None"]
"""Given a running trial's bounds: None to go on, else why it stops."""


def optimistic(bounds: Bounds, name: str, direction: str) -> float | None:
    """The best end of what the running trial can still reach on `name` (None: no bound yet)."""
    if name not in bounds:
        return None
    low, high = bounds[name]
    return high if direction == "maximize" else low


def pessimistic(record: TrialRecord, name: str, direction: str) -> float | None:
    """A rival's worst end: the low end of a maximised figure's interval, the high end of a minimised one."""
    if name not in record.metrics:
        return None
    low, high = interval(record.metrics, name)
    return low if direction == "maximize" else high


def dominated_by(
    bounds: Bounds, records: Sequence[TrialRecord], objectives: Objectives
) -> TrialRecord | None:
    """The first feasible completed trial that dominates the best outcome `bounds` still allow."""
    axes = list(zip(objectives.names, objectives.directions, strict=True))
    best = [optimistic(bounds, n, d) for n, d in axes]
    if any(v is None or math.isnan(v) for v in best):
        return None
    for rival in candidates(records):
        worst = [pessimistic(rival, n, d) for n, d in axes]
        if any(v is None for v in worst):
            continue
        margins = [
            (w - b if d == "maximize" else b - w)  # type: ignore[operator]
            for w, b, (_, d) in zip(worst, best, axes, strict=True)
        ]
        if all(m >= 0 for m in margins) and any(m > 0 for m in margins):
            return rival
    return None


def front_gate(records: Sequence[TrialRecord], objectives: Objectives) -> Gate:
    """A gate against the trials measured so far (those finishing later are not waited for)."""
    axes = list(zip(objectives.names, objectives.directions, strict=True))

    def gate(bounds: Bounds) -> str | None:
        rival = dominated_by(bounds, records, objectives)
        if rival is None:
            return None
        reach = ", ".join(f"{n} {optimistic(bounds, n, d):.4g}" for n, d in axes)
        return f"cannot reach the front: at best {reach}; trial #{rival.number} is better on every objective"

    return gate
