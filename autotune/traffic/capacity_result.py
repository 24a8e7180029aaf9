"""What a capacity search found: its load steps (one load point each) and the capacity they bracket.

Kept apart from the search (autotune.traffic.capacity) because the trial runner, the report and
`autotune bench` read results without running a search."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.traffic.records import RequestRecord

CAPACITY_FILE = "capacity.json"
"""A search's steps and bracket, written into the trial's (or bench run's) directory."""


def load_steps(directory: Path | str | None) -> list[dict[str, Any]]:
    """The open-loop steps saved in `directory`/capacity.json, by offered rate (empty: no search there)."""
    path = Path(directory) / CAPACITY_FILE if directory else None
    if path is None or not path.is_file():
        return []
    steps = [s for s in json.loads(path.read_text())["steps"] if s["kind"] != "probe"]
    return sorted(steps, key=lambda s: s["rate"])


@dataclass
class LoadStep:
    """One load point: the probe (closed, rate 0) or an open-loop step at `rate` req/s."""

    kind: str
    """probe | nominal | search"""
    rate: float
    planned: int
    attainment: float
    carried: bool
    ttft_growth: float
    """Seconds of TTFT gained per second of the step (a queue that grows without bound)."""
    ttft_growth_low: float
    """Its lower 95% bound: a rate is refused for growth only when the growth is beyond the noise."""
    stopped_early: bool
    summary: dict[str, float]
    records: list[RequestRecord] = field(repr=False, default_factory=list)

    @property
    def label(self) -> str:
        return "probe" if self.kind == "probe" else f"{self.kind}_r{self.rate:.3g}"

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "records"}
        out["label"] = self.label
        return out


@dataclass
class CapacityResult:
    target: float
    probe_rps: float
    steps: list[LoadStep]
    capacity_rps: float
    """The highest rate carried (0: none, not even the lowest tried)."""
    failing_rps: float | None
    """The lowest rate that failed above it: the true capacity lies in [capacity_rps, failing_rps)."""
    stopped_by: str | None = None
    """Why the search ended before bracketing the capacity (the front gate), else None."""

    @property
    def nominal(self) -> LoadStep:
        return next(s for s in self.steps if s.kind == "nominal")

    @property
    def at_capacity(self) -> LoadStep | None:
        carried = [s for s in self.steps if s.kind != "probe" and s.carried]
        return max(carried, key=lambda s: s.rate) if carried else None

    def bounds(self, devices: int, margin: float) -> dict[str, tuple[float, float]]:
        """What every figure can still end as, mid-search: the nominal step's are final (their 95%
        intervals), capacities lie between the highest rate carried and `margin` x the probe's rate."""
        summary = self.nominal.summary
        out = {
            k: (summary.get(f"{k}_ci95_low", v), summary.get(f"{k}_ci95_high", v))
            for k, v in summary.items()
            if not k.endswith(("_ci95_low", "_ci95_high"))
        }
        devices = max(devices, 1)
        ceiling = margin * max(self.probe_rps, self.capacity_rps)
        out["capacity_rps"] = (self.capacity_rps, ceiling)
        out["capacity_rps_per_device"] = (self.capacity_rps / devices, ceiling / devices)
        probe = next((s for s in self.steps if s.kind == "probe"), None)
        if probe is not None:
            tokens = margin * probe.summary.get("output_throughput", math.inf)
            out["capacity_output_throughput"] = (0.0, tokens)
            out["capacity_output_throughput_per_device"] = (0.0, tokens / devices)
        return out

    def metrics(self, devices: int) -> dict[str, float]:
        """Flat figures for Optuna, MLflow and the report: the nominal step's summary (vLLM's names, with
        intervals), capacity_* keys, and the at-capacity step's figures prefixed `capacity_`."""
        out = dict(self.nominal.summary)
        devices = max(devices, 1)
        best = self.at_capacity
        out |= {
            "probe_rps": self.probe_rps,
            "devices": float(devices),
            "capacity_steps": float(sum(s.kind != "probe" for s in self.steps)),
            "capacity_rps": self.capacity_rps,
            "capacity_rps_per_device": self.capacity_rps / devices,
            "capacity_rps_bracket_low": self.capacity_rps,
        }
        if self.failing_rps is not None:  # the true capacity lies below the lowest failing rate
            out["capacity_rps_bracket_high"] = self.failing_rps
        if best is not None:
            out |= {f"capacity_{k}": v for k, v in best.summary.items()}
        else:
            out |= {"capacity_output_throughput": 0.0, "capacity_slo_attainment": 0.0}
        out["capacity_output_throughput_per_device"] = out["capacity_output_throughput"] / devices
        tpot_ms = out.get("capacity_median_tpot_ms", 0.0)
        out["capacity_tokens_per_s_per_user"] = 1000.0 / tpot_ms if tpot_ms > 0 else 0.0
        return out
