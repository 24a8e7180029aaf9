"""Ties: two trials whose intervals on the deciding metric overlap cannot be ordered by it.

A tuner that crowns a deployment on noise is worse than none. Each figure a trial reports may carry an
interval: a bootstrap 95% interval (`<metric>_ci95_low/high`) or, for a capacity, the search's bracket
(the true capacity lies between the highest rate carried and the lowest that failed). Trials whose interval
overlaps the best one's are tied with it, and the tie is broken by the next objective, not by noise."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from autotune.report.results import TrialRecord


def interval(metrics: Mapping[str, float], metric: str) -> tuple[float, float]:
    """(low, high) of a metric: its bootstrap interval, its capacity bracket, or the value itself."""
    value = float(metrics[metric])
    low, high = metrics.get(f"{metric}_ci95_low"), metrics.get(f"{metric}_ci95_high")
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        return float(low), float(high)
    if metric in ("capacity_rps", "capacity_rps_per_device"):
        per = float(metrics.get("devices", 1.0)) if metric.endswith("per_device") else 1.0
        high = metrics.get("capacity_rps_bracket_high")
        return value, (float(high) / max(per, 1.0) if high is not None else math.inf)
    return value, value


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def tied_with_best(records: Sequence[TrialRecord], metric: str) -> list[TrialRecord]:
    """The trials (best first) whose interval on `metric` (maximised) overlaps the best value's interval."""
    best = max(records, key=lambda r: (r.metrics[metric], -r.number))
    reach = interval(best.metrics, metric)
    tied = [r for r in records if r is best or overlaps(interval(r.metrics, metric), reach)]
    return sorted(tied, key=lambda r: (r is not best, -r.metrics[metric], r.number))


def break_tie(
    tied: Sequence[TrialRecord], names: Sequence[str], directions: Sequence[str], skip: str
) -> TrialRecord:
    """The tied trial best on the next objectives in order (the deciding metric `skip` left out)."""

    def key(r: TrialRecord) -> tuple[float, ...]:
        values = []
        for name, direction in zip(names, directions, strict=True):
            if name == skip or name not in r.metrics:
                continue
            value = float(r.metrics[name])
            values.append(-value if direction == "maximize" else value)
        return (*values, -r.metrics[skip], r.number)

    return min(tied, key=key)
