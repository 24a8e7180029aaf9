"""Capacity pictures: each trial's latency against offered rate, and the front as throughput per device
against per-user speed (tokens/s each request sees), the way vLLM's sweep and AIConfigurator show it.

Both read the trial's capacity.json (written by the load search) and draw its bootstrap intervals as error
bars; the data is gathered apart from the drawing, so tests can check it without looking at pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autotune.report.pareto import candidates, dominates
from autotune.report.plots import COLORS, new_figure, save_figure
from autotune.report.results import TrialRecord
from autotune.traffic.capacity_result import load_steps

MAX_CURVES = 8
"""More lines than this are unreadable: the trials with the highest capacity are drawn."""


@dataclass(frozen=True)
class CurvePoint:
    rate: float
    value: float
    low: float
    high: float
    carried: bool


def curve(record: TrialRecord, metric: str = "p99_ttft_ms") -> list[CurvePoint]:
    points = []
    for step in load_steps(record.trial_dir):
        summary = step["summary"]
        value = float(summary.get(metric, 0.0))
        low = float(summary.get(f"{metric}_ci95_low", value))
        high = float(summary.get(f"{metric}_ci95_high", value))
        points.append(CurvePoint(float(step["rate"]), value, low, high, bool(step["carried"])))
    return points


def draw_load_curves(records: Sequence[TrialRecord], path: Path, slo_ms: float | None) -> Path | None:
    """p99 TTFT against offered rate per trial; filled markers are carried rates, hollow ones are not."""
    curves = {r.number: curve(r) for r in candidates(records, feasible_only=False)}
    done = [r for r in candidates(records, feasible_only=False) if curves[r.number]]
    if not done:
        return None
    done = sorted(done, key=lambda r: -float(r.metrics.get("capacity_rps", 0.0)))[:MAX_CURVES]
    fig, ax = new_figure()
    for index, record in enumerate(done):
        color = COLORS[index % len(COLORS)]
        points = curves[record.number]
        xs, ys = [p.rate for p in points], [p.value for p in points]
        errors = [[p.value - p.low for p in points], [p.high - p.value for p in points]]
        ax.errorbar(xs, ys, yerr=errors, color=color, linewidth=1, capsize=2, label=f"#{record.number}")
        for p in points:
            ax.scatter([p.rate], [p.value], color=color, facecolors=color if p.carried else "none", s=30)
    if slo_ms is not None:
        ax.axhline(slo_ms, color="#999999", linestyle="--", linewidth=1, label=f"TTFT SLO {slo_ms:g} ms")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("p99 TTFT (ms), 95% interval")
    ax.set_yscale("log")
    ax.set_title("filled: rate carried within the SLOs", fontsize=8)
    return save_figure(fig, ax, path)


@dataclass(frozen=True)
class FrontPoint:
    number: int
    per_user: float
    per_device: float
    low: float
    high: float
    on_front: bool


def capacity_front(records: Sequence[TrialRecord]) -> list[FrontPoint]:
    """Feasible trials at capacity: (tokens/s per user, output tokens/s per device); both maximised."""
    pool = [r for r in candidates(records) if "capacity_tokens_per_s_per_user" in r.metrics]
    pairs = {
        r.number: (
            r.metrics["capacity_tokens_per_s_per_user"],
            r.metrics["capacity_output_throughput_per_device"],
        )
        for r in pool
    }
    points = []
    for r in pool:
        devices = max(float(r.metrics.get("devices", 1.0)), 1.0)
        x, y = pairs[r.number]
        low = float(r.metrics.get("capacity_output_throughput_ci95_low", y * devices)) / devices
        high = float(r.metrics.get("capacity_output_throughput_ci95_high", y * devices)) / devices
        beaten = any(
            dominates(other, (x, y), ("maximize", "maximize")) for n, other in pairs.items() if n != r.number
        )
        points.append(FrontPoint(r.number, x, y, low, high, not beaten))
    return points


def draw_capacity_front(records: Sequence[TrialRecord], path: Path) -> Path | None:
    points = capacity_front(records)
    if not points:
        return None
    fig, ax = new_figure()
    errors = [[p.per_device - p.low for p in points], [p.high - p.per_device for p in points]]
    ax.errorbar(
        [p.per_user for p in points], [p.per_device for p in points], yerr=errors, fmt="o", color=COLORS[0],
        capsize=2, label="feasible trials at capacity",
    )  # fmt: skip
    best = sorted((p for p in points if p.on_front), key=lambda p: p.per_user)
    ax.plot([p.per_user for p in best], [p.per_device for p in best], color="#d62728", label="front")
    for p in points:
        ax.annotate(
            f"#{p.number}", (p.per_user, p.per_device), fontsize=7, xytext=(5, 4), textcoords="offset points"
        )
    ax.set_xlabel("tokens/s per user at capacity (1000 / median TPOT) ↑ better")
    ax.set_ylabel("output tokens/s per device at capacity ↑ better")
    return save_figure(fig, ax, path)
