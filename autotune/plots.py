"""Pareto pictures. Plot data is computed apart from drawing (as Optuna's _get_*_info): the PNGs use
matplotlib, the interactive page uses Optuna's own plot_pareto_front (plotly)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from autotune.pareto import candidates, front
from autotune.results import TrialRecord

LOWER_IS_BETTER = "↓ better"
HIGHER_IS_BETTER = "↑ better"


@dataclass(frozen=True)
class PairInfo:
    """One objective pair: every completed distinct trial, and which are on this pair's front."""

    x_name: str
    y_name: str
    x_direction: str
    y_direction: str
    points: tuple[tuple[float, float, int, bool, bool, bool], ...]
    """(x, y, trial number, on the pair's front, on the full front, feasible)."""

    @property
    def slug(self) -> str:
        return f"{self.x_name}__{self.y_name}"


def pair_infos(
    records: Sequence[TrialRecord], names: Sequence[str], directions: Sequence[str]
) -> list[PairInfo]:
    full = {r.number for r in front(records, directions)}
    done = candidates(records, feasible_only=False)
    infos = []
    for i, j in itertools.combinations(range(len(names)), 2):
        pair = {r.number for r in front(records, directions, indices=(i, j))}
        points = tuple(
            (
                (r.values or ())[i],
                (r.values or ())[j],
                r.number,
                r.number in pair,
                r.number in full,
                r.feasible,
            )
            for r in done
        )
        infos.append(PairInfo(names[i], names[j], directions[i], directions[j], points))
    return infos


def draw_pair_png(info: PairInfo, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    groups = {
        "infeasible (misses a constraint)": [p for p in info.points if not p[5]],
        "dominated": [p for p in info.points if p[5] and not p[3]],
        "Pareto front (this pair)": sorted((p for p in info.points if p[5] and p[3]), key=lambda p: p[0]),
    }
    styles = {
        "infeasible (misses a constraint)": dict(marker="x", color="#bbbbbb", linestyle="none"),
        "dominated": dict(marker="o", color="#8fa8c8", linestyle="none"),
        "Pareto front (this pair)": dict(marker="o", color="#d62728", linestyle="-", markersize=8),
    }
    for label, pts in groups.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **styles[label])  # type: ignore[arg-type]
    for x, y, number, on_pair, _, _ in info.points:
        if on_pair:  # the number only: the report's front table names each configuration
            ax.annotate(f"#{number}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(
        f"{info.x_name} ({HIGHER_IS_BETTER if info.x_direction == 'maximize' else LOWER_IS_BETTER})"
    )
    ax.set_ylabel(
        f"{info.y_name} ({HIGHER_IS_BETTER if info.y_direction == 'maximize' else LOWER_IS_BETTER})"
    )
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
