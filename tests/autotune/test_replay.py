"""The replay harness of the search-efficiency benchmark (bench/replay.py) on a small synthetic grid:
a unit test of the harness; the committed benchmark data is measured (bench/results/grid_chat.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autotune.config.compose import build_settings, compose_config
from autotune.report.objectives import Objectives
from autotune.space.parse import parse_space
from autotune.space.search_space import SearchSpace
from bench.replay import (
    Point,
    grid_key,
    grid_points,
    hypervolume,
    hypervolume_curve,
    load_grid,
    reference_point,
    replay,
)
from serving.config import DeploymentConfig

SETTINGS = build_settings(compose_config("chat", ["quality.enabled=false", "tracking=none"]))
OBJECTIVES = Objectives(SETTINGS.objectives)
BASE = DeploymentConfig()
DIRECTIONS = OBJECTIVES.directions  # capacity per device (max), p99 TTFT, peak RSS (min)


def space(tmp_path: Path) -> SearchSpace:
    return parse_space(
        {
            "dimensions": {
                "parallel.dp": {"type": "categorical", "choices": [1, 2]},
                "scheduler.policy": {"type": "categorical", "choices": ["request", "continuous"]},
                "scheduler.max_num_seqs": {
                    "type": "categorical",
                    "choices": [4, 8, 16],
                    "when": {"scheduler.policy": "continuous"},
                },
            }
        },
        tmp_path / "grid.yaml",
    )


def synthetic_grid(grid_space: SearchSpace) -> dict[str, Point]:
    """Made-up values for a harness test: capacity grows with the batch, dp=2 is pruned for request."""
    points = {}
    for params in grid_space.enumerate():
        batch = params.get("scheduler.max_num_seqs", 1)
        if params["parallel.dp"] == 2 and batch == 1:
            points[grid_key(grid_space, BASE, params)] = Point(params, "PRUNED", reason="made up")
            continue
        capacity = batch / params["parallel.dp"]
        metrics = {"slo_attainment": 0.95 if batch > 1 else 0.5}
        constraints = OBJECTIVES.constraint_values(metrics)
        values = (capacity, 100.0 + 10 * batch, 1000.0 * params["parallel.dp"] + batch)
        points[grid_key(grid_space, BASE, params)] = Point(params, "COMPLETE", values, constraints, metrics)
    return points


def run(tmp_path: Path, sampler: str, n_trials: int, **kwargs: Any) -> tuple[list[Point], dict[str, Point]]:
    grid_space = space(tmp_path)
    grid = synthetic_grid(grid_space)
    settings = SETTINGS.study.__class__(name="r", sampler=sampler, n_trials=n_trials, seed=1)
    return replay(grid, grid_space, BASE, OBJECTIVES, settings, SETTINGS.export, **kwargs), grid


@pytest.mark.parametrize("sampler", ["random", "nsga2", "tpe", "gp", "staged"])
def test_a_replay_measures_distinct_launchable_points_up_to_the_budget(tmp_path: Path, sampler: str) -> None:
    measured, _grid = run(tmp_path, sampler, 5)
    keys = [json.dumps(p.params, sort_keys=True) for p in measured]
    assert len(set(keys)) == len(keys) and all(p.state != "PRUNED" for p in measured)
    # the staged search may stop early, as `autotune run` does: a stage of one choice only repeats
    assert len(measured) == 5 or (sampler == "staged" and len(measured) >= 3)


def test_a_small_grid_is_exhausted_without_looping(tmp_path: Path) -> None:
    measured, grid = run(tmp_path, "random", 50)
    assert len(measured) == sum(p.state != "PRUNED" for p in grid.values())  # 7 of 8


def test_warm_points_are_measured_first(tmp_path: Path) -> None:
    warm = [{"parallel.dp": 1, "scheduler.policy": "continuous", "scheduler.max_num_seqs": 16}]
    measured, _grid = run(tmp_path, "tpe", 3, warm=warm)
    assert measured[0].params == warm[0]


def test_hypervolume_ratio_reaches_one_on_the_whole_grid(tmp_path: Path) -> None:
    measured, grid = run(tmp_path, "random", 50)
    reference = reference_point(list(grid.values()), DIRECTIONS)
    full = hypervolume(list(grid.values()), DIRECTIONS, reference)
    curve = hypervolume_curve(measured, DIRECTIONS, reference, [1, 3, 7])
    assert full > 0 and curve[7] == pytest.approx(full)
    assert curve[1] <= curve[3] <= curve[7]
    infeasible = [p for p in grid.values() if p.state == "COMPLETE" and not p.feasible]
    assert infeasible and hypervolume(infeasible, DIRECTIONS, reference) == 0.0


def test_the_grid_file_is_read_by_deployment_with_the_last_line_of_a_point_kept(tmp_path: Path) -> None:
    grid_space = space(tmp_path)
    params = {"parallel.dp": 1, "scheduler.policy": "request"}
    key = grid_key(grid_space, BASE, params)
    done = {"state": "COMPLETE", "values": [1, 2, 3]}
    lines = [
        {"kind": "meta", "overrides": []},
        {"kind": "point", "params": params, "config_key": key, "state": "FAIL", "reason": "start-up"},
        {"kind": "resume", "date": "later"},
        {"kind": "point", "params": {**params, "kv": 1.0}, "config_key": key, **done},
        {"kind": "point", "params": {}, "config_key": "not in this grid", **done},
    ]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta, rows = load_grid(path)
    points, missing = grid_points(grid_space, BASE, rows)
    assert meta["overrides"] == [] and points[key].state == "COMPLETE"
    assert list(points) == [key] and len(missing) == 7
