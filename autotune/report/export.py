"""Pick one deployment from a finished study by a stated policy and write best.yaml.

best.yaml keeps the DeploymentConfig schema under `deployment:` (so `serving launch best.yaml` starts
exactly that config), plus why it was chosen, the metrics it was chosen on, and the engine command.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from autotune.config.settings import ExportSettings
from autotune.report.objectives import Objectives
from autotune.report.pareto import candidates, front, knee
from autotune.report.results import TrialRecord
from autotune.report.ties import break_tie, tied_with_best
from serving.backends import get_backend
from serving.config import DeploymentConfig


class NoSelection(ValueError):
    """No trial satisfies the policy; the message says what the study lacks."""


@dataclass(frozen=True)
class Selection:
    record: TrialRecord
    policy: str
    explanation: str
    tied: tuple[int, ...] = ()
    """Trials whose interval on the deciding metric overlapped the best one's (the selected included)."""


def select(records: Sequence[TrialRecord], objectives: Objectives, settings: ExportSettings) -> Selection:
    directions = objectives.directions
    feasible = candidates(records)
    if not feasible:
        done = candidates(records, feasible_only=False)
        what = (
            "no trial completed"
            if not done
            else f"none of {len(done)} completed trials meets the constraints"
        )
        bounds = ", ".join(objectives.describe_constraints()) or "none"
        raise NoSelection(f"{what} (constraints: {bounds}); loosen the SLOs or widen the space")
    if settings.policy == "max_throughput_within_slo":
        metric = settings.throughput_metric
        missing = [r.number for r in feasible if metric not in r.metrics]
        if missing:
            raise NoSelection(f"export.throughput_metric={metric!r} is missing from trials {missing}")
        tied = tied_with_best(feasible, metric)
        best = break_tie(tied, objectives.names, directions, skip=metric)
        bounds = ", ".join(objectives.describe_constraints()) or "no constraints"
        why = f"highest {metric} ({best.metrics[metric]:.4g}) among {len(feasible)} trials meeting {bounds}"
        if len(tied) > 1:
            others = ", ".join(f"#{r.number} ({r.metrics[metric]:.4g})" for r in tied if r is not best)
            nexts = [n for n in objectives.names if n != metric] or ["the trial number"]
            why = (
                f"tied on {metric} within its interval with {others}, among {len(feasible)} trials meeting "
                f"{bounds}; the tie broken by {nexts[0]}"
            )
        return Selection(best, settings.policy, why, tuple(r.number for r in tied))
    points = front(records, directions)
    chosen = knee(points, directions)
    if chosen is None:  # pragma: no cover - feasible trials always give a non-empty front
        raise NoSelection("the Pareto front is empty")
    why = (
        f"knee of the {len(points)}-point feasible front: "
        "nearest the ideal point with each objective scaled to [0, 1]"
    )
    return Selection(chosen, settings.policy, why)


def deployment_config(record: TrialRecord) -> DeploymentConfig:
    """The deployment a trial measured, without its port (every launch picks a free one)."""
    return DeploymentConfig().replace(**{k: v for k, v in record.deployment.items() if k != "server.port"})


def engine_command(config: DeploymentConfig) -> str:
    """The server command line for this deployment (as the backend would launch it)."""
    argv = get_backend(config.backend).command(config, config.server.port)
    if argv[1:3] == ["-m", "serving.cli"]:
        argv = ["serving", *argv[3:]]
    return shlex.join(argv)


def best_yaml(
    selection: Selection,
    objectives: Objectives,
    study_name: str,
    remeasured: dict[str, Any] | None = None,
    measured_on: dict[str, str] | None = None,
) -> dict[str, Any]:
    record = selection.record
    config = deployment_config(record)
    chosen_on = {name: record.metrics.get(name) for name in objectives.names}
    return {
        "deployment": config.to_dict(),
        "selected_by": {
            "policy": selection.policy,
            "explanation": selection.explanation,
            "study": study_name,
            "trial": record.number,
            "objectives": dict(zip(objectives.names, objectives.directions, strict=True)),
            "constraints": objectives.describe_constraints(),
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tied_with": [n for n in selection.tied if n != record.number],
        },
        "remeasured": remeasured,
        "measured_on": measured_on,
        "metrics": {"objectives": chosen_on, "all": dict(sorted(record.metrics.items()))},
        "command": engine_command(config),
        "launch": "serving launch best.yaml",
    }


def write_best(
    path: Path,
    selection: Selection,
    objectives: Objectives,
    study_name: str,
    *,
    remeasured: dict[str, Any] | None = None,
    measured_on: dict[str, str] | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = best_yaml(selection, objectives, study_name, remeasured, measured_on)
    header = (
        f"# Exported by autotune from study {study_name!r}, trial {selection.record.number}.\n"
        "# Start it with: serving launch best.yaml\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path
