"""Pareto pictures. Plot data is computed apart from drawing (as Optuna's _get_*_info): the PNGs use
matplotlib, the interactive page uses Optuna's own plot_pareto_front (plotly)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from autotune.report.pareto import candidates, front
from autotune.report.results import TrialRecord

LOWER_IS_BETTER = "↓ better"
HIGHER_IS_BETTER = "↑ better"
COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    number: int
    on_pair_front: bool
    feasible: bool
    group: str
    """The value of the colouring parameter (e.g. scheduler.policy)."""


@dataclass(frozen=True)
class PairInfo:
    """One objective pair: every completed distinct trial, this pair's front, and the bounds."""

    x_name: str
    y_name: str
    x_direction: str
    y_direction: str
    points: tuple[Point, ...]
    x_bound: float | None
    y_bound: float | None
    feasible_front: bool
    """False when no trial meets the constraints: the front shown then ignores them."""
    group_by: str

    @property
    def slug(self) -> str:
        return f"{self.x_name}__{self.y_name}"


def pair_infos(
    records: Sequence[TrialRecord],
    names: Sequence[str],
    directions: Sequence[str],
    bounds: dict[str, float] | None = None,
    group_by: str = "scheduler.policy",
) -> list[PairInfo]:
    done = candidates(records, feasible_only=False)
    feasible = bool(candidates(records))
    infos = []
    for i, j in itertools.combinations(range(len(names)), 2):
        pair = {r.number for r in front(records, directions, indices=(i, j), feasible_only=feasible)}
        points = tuple(
            Point(
                (r.values or ())[i],
                (r.values or ())[j],
                r.number,
                r.number in pair,
                r.feasible,
                str(r.deployment.get(group_by, r.params.get(group_by, "?"))),
            )
            for r in done
        )
        infos.append(
            PairInfo(
                names[i],
                names[j],
                directions[i],
                directions[j],
                points,
                (bounds or {}).get(names[i]),
                (bounds or {}).get(names[j]),
                feasible,
                group_by,
            )
        )
    return infos


def _axis_label(name: str, direction: str) -> str:
    return f"{name} ({HIGHER_IS_BETTER if direction == 'maximize' else LOWER_IS_BETTER})"


def draw_pair_png(info: PairInfo, path: Path) -> Path:
    """Trials coloured by `group_by`; infeasible ones as crosses; the pair's front as a red line."""
    fig, ax = new_figure()
    groups = sorted({p.group for p in info.points})
    for index, group in enumerate(groups):
        color = COLORS[index % len(COLORS)]
        for feasible, marker in ((True, "o"), (False, "x")):
            pts = [p for p in info.points if p.group == group and p.feasible == feasible]
            if pts:
                label = f"{group}" + ("" if feasible else " (misses a constraint)")
                ax.scatter(
                    [p.x for p in pts], [p.y for p in pts], marker=marker, color=color, label=label, s=36
                )
    front_pts = sorted((p for p in info.points if p.on_pair_front), key=lambda p: p.x)
    if front_pts:
        what = "Pareto front" if info.feasible_front else "front ignoring constraints (none feasible)"
        ax.plot(
            [p.x for p in front_pts],
            [p.y for p in front_pts],
            color="#d62728",
            linewidth=1.2,
            marker="o",
            markerfacecolor="none",
            markersize=11,
            label=what,
        )
        for p in front_pts:
            ax.annotate(f"#{p.number}", (p.x, p.y), fontsize=7, xytext=(5, 4), textcoords="offset points")
    if info.x_bound is not None:
        ax.axvline(
            info.x_bound, color="#999999", linestyle="--", linewidth=1, label=f"bound {info.x_bound:g}"
        )
    if info.y_bound is not None:
        ax.axhline(
            info.y_bound, color="#999999", linestyle="--", linewidth=1, label=f"bound {info.y_bound:g}"
        )
    ys = [p.y for p in info.points if p.y > 0]
    if ys and max(ys) / min(ys) > 100:
        ax.set_yscale("log")
    ax.set_xlabel(_axis_label(info.x_name, info.x_direction))
    ax.set_ylabel(_axis_label(info.y_name, info.y_direction))
    ax.set_title(f"colour: {info.group_by}", fontsize=8)
    return save_figure(fig, ax, path)


def new_figure() -> tuple[Any, Any]:
    """A figure and axes for a report PNG (matplotlib's Agg backend: no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.6), dpi=110)


def save_figure(fig: Any, ax: Any, path: Path) -> Path:
    """Grid, legend and tight layout as every report PNG has them; written to `path` and closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pick(*indices: int) -> Callable[[FrozenTrial], list[float]]:
    """A `targets` function for Optuna's plots: some of a trial's objective values."""

    def targets(trial: FrozenTrial) -> list[float]:
        return [trial.values[i] for i in indices]

    return targets


def write_interactive(study: optuna.Study, names: Sequence[str], path: Path) -> Path | None:
    """Optuna's plot_pareto_front for the whole front and every pair, in one self-contained page."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        return None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no feasible trials" is in the report already
    figures = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    if len(names) in (2, 3):
        figures.append(optuna.visualization.plot_pareto_front(study, target_names=list(names)))
    for i, j in itertools.combinations(range(len(names)), 2):
        figures.append(
            optuna.visualization.plot_pareto_front(
                study,
                targets=_pick(i, j),
                target_names=[names[i], names[j]],
            )
        )
    parts = [fig.to_html(full_html=False, include_plotlyjs=(index == 0)) for index, fig in enumerate(figures)]
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Pareto front</title></head><body>"
        + "".join(parts)
        + "</body></html>"
    )
    return path
