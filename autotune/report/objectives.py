"""Turn a trial's measured metrics into Optuna objective values and constraint values."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from autotune.config.settings import ObjectivesSettings

_LATENCY = re.compile(
    r"^(mean|median|std|p\d+(\.\d+)?)_(ttft|tpot|itl|e2el|schedule_lag|client_queue_time)_ms$"
)
_NAMED = {
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "request_goodput",
    "max_schedule_lag_ms",
    "max_concurrent_requests",
    "max_output_tokens_per_s",
    "peak_rss_mb",
    "startup_s",
}
"""Metrics every trial reports: the traffic runner's summary (vLLM bench-serve names) plus server stats."""
_QUALITY = {
    "quality_token_agreement",
    "quality_mean_kl",
    "quality_perplexity",
    "quality_perplexity_ratio",
    "quality_synthetic",
}
"""The quality probe's metrics (autotune/quality), when the study's quality guard is enabled."""


def check_metric_name(metric: str, where: str) -> None:
    """Reject a typo before any server starts."""
    if metric in _NAMED or metric in _QUALITY or _LATENCY.match(metric):
        return
    raise ValueError(
        f"{where}: {metric!r} is not a benchmark metric; use one of {sorted(_NAMED | _QUALITY)} or "
        "{mean,median,std,p50,p90,p95,p99}_{ttft,tpot,itl,e2el}_ms"
    )


@dataclass(frozen=True)
class Objectives:
    """Ordered objectives and constraints; values are what Optuna is told."""

    settings: ObjectivesSettings
    extra_bounds: tuple[tuple[str, str, float], ...] = ()
    """Bounds from other sections (the quality guard's), as (metric, 'max' | 'min', bound)."""

    def __post_init__(self) -> None:
        for metric in self.settings.directions:
            check_metric_name(metric, f"objectives.directions.{metric}")
        for metric, _, _ in self.settings.bounds():
            check_metric_name(metric, f"objectives.constraints.{metric}")

    def bounds(self) -> list[tuple[str, str, float]]:
        """Every active constraint: objectives.constraints / min_constraints, then the extra bounds."""
        return [*self.settings.bounds(), *self.extra_bounds]

    @property
    def names(self) -> list[str]:
        return list(self.settings.directions)

    @property
    def directions(self) -> list[str]:
        return list(self.settings.directions.values())

    def values(self, metrics: Mapping[str, float]) -> list[float]:
        """Objective values in order; a missing or non-finite metric is an error naming it."""
        values = []
        for name in self.names:
            if name not in metrics:
                raise KeyError(f"metric {name!r} missing from the benchmark summary (has {sorted(metrics)})")
            value = float(metrics[name])
            if not math.isfinite(value):
                raise ValueError(f"metric {name}={value}: not finite (too few completed requests?)")
            values.append(value)
        return values

    def constraint_values(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Optuna convention: <= 0 is satisfied; the value is how far past the bound the metric is."""
        out: dict[str, float] = {}
        for metric, kind, bound in self.bounds():
            value = float(metrics.get(metric, math.inf if kind == "max" else -math.inf))
            excess = value - bound if kind == "max" else bound - value
            out[f"{metric}_{kind}"] = excess if math.isfinite(excess) else 1e12
        return out

    def describe_constraints(self) -> list[str]:
        return [f"{m} {'<=' if k == 'max' else '>='} {b:g}" for m, k, b in self.bounds()]
