"""Pareto fronts over trial records: non-dominated, feasible, measured configurations; and the knee."""

from __future__ import annotations

import math
from collections.abc import Sequence

from autotune.report.results import TrialRecord, distinct


def _oriented(values: Sequence[float], directions: Sequence[str]) -> list[float]:
    """Values turned so that smaller is better for every objective."""
    return [-v if d == "maximize" else v for v, d in zip(values, directions, strict=True)]


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    oa, ob = _oriented(a, directions), _oriented(b, directions)
    return all(x <= y for x, y in zip(oa, ob, strict=True)) and any(
        x < y for x, y in zip(oa, ob, strict=True)
    )


def candidates(records: Sequence[TrialRecord], *, feasible_only: bool = True) -> list[TrialRecord]:
    """Completed, distinct trials (and feasible ones, unless asked otherwise)."""
    done = [r for r in distinct(list(records)) if r.complete]
    return [r for r in done if r.feasible] if feasible_only else done


def front(
    records: Sequence[TrialRecord],
    directions: Sequence[str],
    indices: Sequence[int] | None = None,
    *,
    feasible_only: bool = True,
) -> list[TrialRecord]:
    """The feasible non-dominated trials; `indices` restricts to some objectives (pairwise plots)."""
    pool = candidates(records, feasible_only=feasible_only)
    axes = list(indices) if indices is not None else list(range(len(directions)))
    dirs = [directions[i] for i in axes]

    def pick(r: TrialRecord) -> list[float]:
        values = r.values or ()
        return [values[i] for i in axes]

    kept = [r for r in pool if not any(dominates(pick(o), pick(r), dirs) for o in pool if o is not r)]
    unique: dict[tuple[float, ...], TrialRecord] = {}
    for r in sorted(kept, key=lambda r: r.number):
        unique.setdefault(tuple(pick(r)), r)
    return sorted(unique.values(), key=lambda r: r.number)


def knee(points: Sequence[TrialRecord], directions: Sequence[str]) -> TrialRecord | None:
    """The point nearest the ideal after scaling every objective to [0, 1] over the given points."""
    scored = [r for r in points if r.values is not None]
    if not scored:
        return None
    oriented = [_oriented(r.values or (), directions) for r in scored]
    lows = [min(col) for col in zip(*oriented, strict=True)]
    highs = [max(col) for col in zip(*oriented, strict=True)]

    def distance(vals: list[float]) -> float:
        scaled = [
            (v - lo) / (hi - lo) if hi > lo else 0.0 for v, lo, hi in zip(vals, lows, highs, strict=True)
        ]
        return math.sqrt(sum(s * s for s in scaled))

    best = min(range(len(scored)), key=lambda i: (distance(oriented[i]), scored[i].number))
    return scored[best]
