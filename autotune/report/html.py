"""reports/<study>/: report.html (Pareto plots per objective pair, the front, parameter importances,
failed and pruned trials with reasons), pareto.html (interactive), trials.csv and best.yaml."""

from __future__ import annotations

import csv
import html
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from autotune.config.settings import ExportSettings
from autotune.report import quality as quality_report
from autotune.report.curves import draw_capacity_front, draw_load_curves
from autotune.report.export import NoSelection, Selection, select, write_best
from autotune.report.objectives import Objectives
from autotune.report.pareto import front
from autotune.report.plots import draw_pair_png, pair_infos, write_interactive
from autotune.report.results import TrialRecord, distinct


@dataclass
class ReportFiles:
    directory: Path
    html: Path
    csv: Path
    pngs: list[Path] = field(default_factory=list)
    interactive: Path | None = None
    best: Path | None = None
    selection: Selection | None = None
    selection_error: str | None = None
    remeasured: dict[str, Any] | None = None
    front: list[int] = field(default_factory=list)

    def all(self) -> list[Path]:
        paths = [self.html, self.csv, *self.pngs]
        paths += [p for p in (self.interactive, self.best) if p is not None]
        return paths


MIN_TRIALS_FOR_IMPORTANCE = 5
"""Fewer points than this make a random-forest importance estimate noise."""


def _objective(index: int) -> Callable[[FrozenTrial], float]:
    def target(trial: FrozenTrial) -> float:
        return float(trial.values[index])

    return target


def importances(study: optuna.Study, names: Sequence[str]) -> dict[str, dict[str, float]] | str:
    """fANOVA importance of each sampled parameter for each objective (Optuna's evaluator)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return f"needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials, the study has {len(complete)}"
    out: dict[str, dict[str, float]] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for index, name in enumerate(names):
                out[name] = optuna.importance.get_param_importances(study, target=_objective(index))
    except (ValueError, RuntimeError) as err:
        return f"not available: {err}"
    return out


def write_csv(records: Sequence[TrialRecord], on_front: set[int], path: Path) -> Path:
    """One row per trial: state, sampled values, every metric, the reason (the MLflow parent's table)."""
    params = sorted({k for r in records for k in r.params})
    metrics = sorted({k for r in records for k in r.metrics})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", "repeat_of", "feasible", "pareto", *params, *metrics, "reason"])
        for r in records:
            writer.writerow(
                [
                    r.number,
                    r.state,
                    r.repeat_of if r.repeat_of is not None else "",
                    r.complete and r.feasible,
                    r.number in on_front,
                    *(r.params.get(p, "") for p in params),
                    *(r.metrics.get(m, "") for m in metrics),
                    r.reason or "",
                ]
            )
    return path


def write_report(
    study: optuna.Study,
    records: Sequence[TrialRecord],
    objectives: Objectives,
    export: ExportSettings,
    directory: Path,
    *,
    context: dict[str, str],
    best_path: Path | None = None,
    group_by: str = "scheduler.policy",
    remeasure: Callable[[Selection], tuple[Selection, dict[str, Any]] | None] | None = None,
    ttft_slo_ms: float | None = None,
    measured_on: dict[str, str] | None = None,
) -> ReportFiles:
    """Everything in `directory`; `group_by` is the deployment key that colours the Pareto plots."""
    directory.mkdir(parents=True, exist_ok=True)
    names, directions = objectives.names, objectives.directions
    front_records = front(records, directions)
    on_front = {r.number for r in front_records}
    files = ReportFiles(
        directory, directory / "report.html", write_csv(records, on_front, directory / "trials.csv")
    )
    files.front = sorted(on_front)
    bounds = {m: b for m, kind, b in objectives.settings.bounds() if kind == "max"}
    bounds.update({m: b for m, kind, b in objectives.settings.bounds() if kind == "min"})
    for info in pair_infos(records, names, directions, bounds, group_by):
        files.pngs.append(draw_pair_png(info, directory / f"pareto_{info.slug}.png"))
    for drawn in (
        draw_capacity_front(records, directory / "capacity_front.png"),
        draw_load_curves(records, directory / "load_curves.png", ttft_slo_ms),
    ):
        if drawn is not None:
            files.pngs.append(drawn)
    files.interactive = write_interactive(study, names, directory / "pareto.html")
    try:
        files.selection = select(records, objectives, export)
        again = remeasure(files.selection) if remeasure is not None else None
        if again is not None:  # the selection made again on fresh launches of it and its contenders
            files.selection, files.remeasured = again
        files.best = write_best(
            best_path or directory / "best.yaml",
            files.selection,
            objectives,
            study.study_name,
            remeasured=files.remeasured,
            measured_on=measured_on,
        )
    except NoSelection as err:
        files.selection_error = str(err)
    context = {**context, **{f"machine: {k}": v for k, v in (measured_on or {}).items()}}
    files.html.write_text(
        _html(study.study_name, records, objectives, front_records, files, importances(study, names), context)
    )
    return files


# --- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3} tr.front td{background:#fff3f0}
.plots img{max-width:48%;margin:4px;border:1px solid #eee}
code{background:#f6f6f6;padding:1px 4px}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = ""
    for index, row in enumerate(rows):
        cls = f" class='{classes[index]}'" if index < len(classes) and classes[index] else ""
        body += f"<tr{cls}>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(
    name: str,
    records: Sequence[TrialRecord],
    objectives: Objectives,
    front_records: list[TrialRecord],
    files: ReportFiles,
    imps: dict[str, dict[str, float]] | str,
    context: dict[str, str],
) -> str:
    names = objectives.names
    own = distinct(list(records))
    counts = {s: sum(1 for r in own if r.state == s) for s in ("COMPLETE", "FAIL", "PRUNED")}
    parts = [f"<h1>autotune study <code>{html.escape(name)}</code></h1>"]
    parts.append(
        f"<p>Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. "
        + " · ".join(f"{k.lower()}: {v}" for k, v in counts.items())
        + f" · repeats reused: {len(records) - len(own)}</p>"
    )
    parts.append(_table(["setting", "value"], sorted(context.items())))
    objective_text = ", ".join(f"{n} ({d})" for n, d in zip(names, objectives.directions, strict=True))
    parts.append(
        f"<p>Objectives: {html.escape(objective_text)}. Constraints: "
        f"{html.escape(', '.join(objectives.describe_constraints()) or 'none')}.</p>"
    )
    parts.append("<h2>Pareto fronts</h2><div class='plots'>")
    parts += [f"<img src='{p.name}' alt='{html.escape(p.stem)}'>" for p in files.pngs]
    parts.append("</div>")
    if files.interactive:
        parts.append(
            f"<p>Interactive (Optuna / plotly): <a href='{files.interactive.name}'>pareto.html</a></p>"
        )
    parts.append(f"<h2>The front ({len(front_records)} feasible, non-dominated configurations)</h2>")
    if not front_records:
        front_records = front(records, objectives.directions, feasible_only=False)
        parts.append(
            "<p>No trial meets every constraint; the non-dominated trials ignoring the constraints are "
            f"listed instead ({len(front_records)}). Loosen the SLOs (slo.ttft_ms, slo.tpot_ms), lower the "
            "offered load, or widen the space.</p>"
        )
    selected = files.selection.record.number if files.selection else None
    rows = [
        [
            f"#{r.number}" + (" (selected)" if r.number == selected else ""),
            r.label or "base",
            *((r.values or ())[: len(names)]),
        ]
        for r in front_records
    ]
    parts.append(_table(["trial", "configuration", *names], rows))
    parts.append("<h2>Selected deployment</h2>")
    if files.selection and files.best:
        parts.append(
            f"<p>{html.escape(files.selection.explanation)}: trial #{selected} "
            f"(<a href='{files.best.name}'>{files.best.name}</a>; "
            f"<code>serving launch {files.best.name}</code>).</p>"
        )
        if files.remeasured is not None:
            parts.append(f"<p>{html.escape(str(files.remeasured['summary']))}</p>")
        else:
            parts.append(
                "<p>Not re-measured (export.remeasure=0): best.yaml carries the trial's numbers.</p>"
            )
    else:
        parts.append(f"<p>None: {html.escape(files.selection_error or 'no trials')}</p>")
    parts.append("<h2>Parameter importances (fANOVA)</h2>")
    if isinstance(imps, str):
        parts.append(f"<p>{html.escape(imps)}</p>")
    else:
        params = sorted({p for v in imps.values() for p in v})
        parts.append(
            _table(["parameter", *imps], [[p, *(imps[n].get(p, 0.0) for n in imps)] for p in params])
        )
    parts.append("<h2>All trials</h2>")
    shown = [r for r in records if r.state not in ("WAITING", "RUNNING")]
    on_front = {r.number for r in front_records}
    rows = [
        [
            r.number,
            r.state + ("" if r.repeat_of is None else f" (repeat of #{r.repeat_of})"),
            r.label or "base",
            *((r.values or ("",) * len(names))[: len(names)]),
            *quality_report.cells(r, shown),
            "yes" if r.complete and r.feasible else ("no" if r.complete else ""),
        ]
        for r in shown
    ]
    if quality_report.note(shown):
        parts.append(f"<p>{html.escape(quality_report.note(shown))}</p>")
    parts.append(
        _table(
            ["trial", "state", "configuration", *names, *quality_report.header(shown), "feasible"],
            rows,
            ["front" if r.number in on_front else "" for r in shown],
        )
    )
    bad = [r for r in own if r.state in ("FAIL", "PRUNED")]
    parts.append(f"<h2>Failed and pruned trials ({len(bad)})</h2>")
    parts.append(
        _table(
            ["trial", "state", "configuration", "reason"],
            [[r.number, r.state, r.label or "base", r.reason or ""] for r in bad],
        )
    )
    parts.append(f"<p>All trials as CSV: <a href='{files.csv.name}'>{files.csv.name}</a>.</p>")
    head = f"<meta charset='utf-8'><title>autotune {html.escape(name)}</title><style>{CSS}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"
