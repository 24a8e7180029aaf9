"""Replay a sampler against a measured grid: the study loop's ask/tell, with a lookup instead of a launch.

The replay space is the grid's own space (bench/grid/chat_grid.yaml): every sample a sampler can draw is
a grid point, so no point is invented and none has to be mapped to a neighbour. Each ask is handled as
`autotune run` handles it (autotune/study/loop.py): a point the pre-launch check pruned is told PRUNED
and costs nothing; a point already measured in this replay is a repeat (its values again, no cost); a
measured point is told its objective values and constraints (or FAIL) and counts toward the budget.
The measured points' feasible hypervolume after each count is what bench/search_efficiency.py tables.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.trial import TrialState

from autotune.config.settings import ExportSettings, StudySettings
from autotune.report import results as R
from autotune.report.objectives import Objectives
from autotune.space.search_space import SearchSpace
from autotune.study.loop import config_key
from autotune.study.samplers import make_sampler
from autotune.study.staged import policy_pick
from serving.config import ConfigError, DeploymentConfig


def grid_key(space: SearchSpace, base: DeploymentConfig, params: Mapping[str, Any]) -> str:
    """A grid point's identity as bench/grid_measure.py wrote it: the study loop's key of the deployment
    (so two params that launch the same deployment are one point), or the params of an invalid one."""
    try:
        return config_key(space.deployment(base, params))
    except ConfigError:
        return json.dumps(dict(params), sort_keys=True)


@dataclass(frozen=True)
class Point:
    """One measured (or pruned) grid point, as bench/grid_measure.py wrote it."""

    params: dict[str, Any]
    state: str
    values: tuple[float, ...] | None = None
    constraints: Mapping[str, float] | None = None
    metrics: Mapping[str, float] | None = None
    reason: str | None = None

    @property
    def feasible(self) -> bool:
        return self.state == "COMPLETE" and all(v <= 0 for v in (self.constraints or {}).values())


def read_rows(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The grid file's metadata line (None: none yet) and its point rows by config key; a later line of
    a point (from `--retry-failed`) supersedes an earlier one."""
    meta: dict[str, Any] | None = None
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("kind") == "meta":
            meta = row
        elif row.get("kind") == "point":
            rows[row["config_key"]] = row
    return meta, rows


def load_grid(path: Path) -> tuple[dict[str, Any], dict[str, Point]]:
    """The metadata line and the points by key, as measured."""
    meta, rows = read_rows(path)
    points = {
        key: Point(
            params=row["params"],
            state=row["state"],
            values=tuple(row["values"]) if row.get("values") else None,
            constraints=row.get("constraints"),
            metrics=row.get("metrics"),
            reason=row.get("reason"),
        )
        for key, row in rows.items()
    }
    return meta or {}, points


def grid_points(
    space: SearchSpace, base: DeploymentConfig, rows: Mapping[str, Point]
) -> tuple[dict[str, Point], list[dict[str, Any]]]:
    """The rows of the space's grid points by key (rows of other points left out), and the points the
    file lacks."""
    points: dict[str, Point] = {}
    missing: list[dict[str, Any]] = []
    for params in space.enumerate():
        key = grid_key(space, base, params)
        if key in rows:
            points[key] = rows[key]
        else:
            missing.append(params)
    return points, missing


def losses(points: Sequence[Point], directions: Sequence[str]) -> np.ndarray:
    """Objective values as minimisation losses (maximised ones negated)."""
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return np.array([p.values for p in points], dtype=float).reshape(-1, len(directions)) * sign


def reference_point(points: Sequence[Point], directions: Sequence[str]) -> np.ndarray:
    """10% of each objective's range beyond the worst feasible grid value, so edge points count too."""
    feasible = losses([p for p in points if p.feasible], directions)
    worst, best = feasible.max(axis=0), feasible.min(axis=0)
    return worst + 0.1 * np.maximum(worst - best, 1e-9)


def hypervolume(points: Sequence[Point], directions: Sequence[str], reference: np.ndarray) -> float:
    """Optuna's hypervolume of the feasible points (0 when none is feasible)."""
    feasible = [p for p in points if p.feasible]
    if not feasible:
        return 0.0
    return float(compute_hypervolume(losses(feasible, directions), reference))


def replay(
    grid: Mapping[str, Point],
    space: SearchSpace,
    base: DeploymentConfig,
    objectives: Objectives,
    settings: StudySettings,
    export: ExportSettings,
    warm: Sequence[Mapping[str, Any]] = (),
    max_asks: int = 2000,
) -> list[Point]:
    """The points one study of `settings.sampler` measures, in order, up to `settings.n_trials`.
    `warm` (the warm start's list) is enqueued after the space's seeds, as the study loop does."""
    pick = policy_pick(objectives, export)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = make_sampler(settings, space, pick)
        study = optuna.create_study(directions=objectives.directions, sampler=sampler)
    for params in (*space.seeds, *warm):
        study.enqueue_trial(dict(params), skip_if_exists=True)
    measured: list[Point] = []
    told: dict[str, int] = {}
    idle = 0
    for _ in range(max_asks):
        if len(measured) >= settings.n_trials or idle >= settings.max_repeats:
            break
        trial = study.ask()
        key = grid_key(space, base, space.active_params(space.suggest(trial)))
        if key not in grid:
            raise KeyError(f"sampled {key}, which is not a grid point: is the grid file complete?")
        point = grid[key]
        if key in told or point.state == "PRUNED":
            _tell_again(study, trial, point, told.get(key))
            idle += 1
            continue
        idle = 0
        told[key] = trial.number
        trial.set_user_attr(R.MEASURED, True)
        trial.set_user_attr(R.METRICS, dict(point.metrics or {}))
        measured.append(point)
        _tell_measured(study, trial, point)
    return measured


def _tell_again(study: optuna.Study, trial: optuna.Trial, point: Point, earlier: int | None) -> None:
    """A pruned point, or a repeat of one measured earlier in this replay: nothing launched."""
    if earlier is None:
        trial.set_user_attr(R.REASON, point.reason or "pruned")
        study.tell(trial, state=TrialState.PRUNED)
        return
    trial.set_user_attr(R.REPEAT_OF, earlier)
    trial.set_user_attr(R.METRICS, dict(point.metrics or {}))
    _tell_measured(study, trial, point)


def _tell_measured(study: optuna.Study, trial: optuna.Trial, point: Point) -> None:
    """The point's values and constraints as its measurement left them, or FAIL."""
    if point.state == "COMPLETE" and point.values is not None:
        for name, value in (point.constraints or {}).items():
            trial.set_constraint(name, value)
        study.tell(trial, list(point.values))
    else:
        study.tell(trial, state=TrialState.FAIL)


def hypervolume_curve(
    measured: Sequence[Point], directions: Sequence[str], reference: np.ndarray, budgets: Sequence[int]
) -> dict[int, float]:
    """Hypervolume of the first n measured points, for each budget n."""
    return {n: hypervolume(measured[:n], directions, reference) for n in budgets}


def with_sampler(settings: StudySettings, sampler: str, seed: int, n_trials: int) -> StudySettings:
    return replace(settings, sampler=sampler, seed=seed, n_trials=n_trials)
