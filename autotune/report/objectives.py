"""Turn a trial's measured metrics into Optuna objective values and constraint values."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from autotune.config.settings import ObjectivesSettings
from serving.config import ConfigError, closest_key

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
    "slo_attainment",
    "max_schedule_lag_ms",
    "max_concurrent_requests",
    "max_output_tokens_per_s",
    "peak_rss_mb",
    "startup_s",
    "offered_rps",
    "ttft_growth_s_per_s",
}
"""Metrics every trial reports: the traffic runner's summary (vLLM bench-serve names) plus server stats."""
_CAPACITY = {
    "probe_rps",
    "devices",
    "capacity_steps",
    "capacity_rps",
    "capacity_rps_per_device",
    "capacity_rps_bracket_low",
    "capacity_rps_bracket_high",
    "capacity_output_throughput_per_device",
    "capacity_tokens_per_s_per_user",
}
"""The capacity search's figures (autotune.traffic.capacity); `capacity_<metric>` is a metric at capacity."""


_QUALITY = {
    "quality_token_agreement",
    "quality_mean_kl",
    "quality_perplexity",
    "quality_perplexity_ratio",
    "quality_synthetic",
}
"""The quality probe's metrics (autotune/quality), when the study's quality guard is enabled."""


def is_metric_name(metric: str) -> bool:
    """A figure some trial reports: a summary key, at capacity (`capacity_` prefix), or an interval end."""
    if metric in _CAPACITY or metric in _QUALITY:
        return True
    base = metric.removesuffix("_ci95_low").removesuffix("_ci95_high").removeprefix("capacity_")
    return base in _NAMED or bool(_LATENCY.match(base))


def check_metric_name(metric: str, where: str) -> None:
    """Reject a typo before any server starts (a misspelled objective would fail every trial)."""
    if is_metric_name(metric):
        return
    examples = [f"{s}_{m}_ms" for s in ("mean", "median", "p90", "p99") for m in ("ttft", "tpot", "e2el")]
    close = closest_key(metric, [*_NAMED, *_CAPACITY, *_QUALITY, *examples])
    hint = f" (did you mean {close!r}?)" if close else ""
    named = sorted(_NAMED | _CAPACITY | _QUALITY)
    raise ConfigError(
        f"{where}: {metric!r} is not a benchmark metric{hint}; use one of {named}, "
        "{mean,median,std,p50,p90,p95,p99}_{ttft,tpot,itl,e2el}_ms, a `capacity_` prefix for the figure "
        "at capacity, or a `_ci95_low` / `_ci95_high` suffix for its interval"
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
        for section in ("constraints", "min_constraints"):  # disabled (null) ones too: a typo is a typo
            for metric in getattr(self.settings, section):
                check_metric_name(metric, f"objectives.{section}.{metric}")

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

    def meets_measured_bounds(self, metrics: Mapping[str, float]) -> bool:
        """Every bound whose metric `metrics` holds is met (a bound on a metric not measured, say the
        quality probe's in a re-measure, is not judged)."""
        return all(
            (metrics[m] <= bound if kind == "max" else metrics[m] >= bound)
            for m, kind, bound in self.bounds()
            if m in metrics
        )

    def describe_constraints(self) -> list[str]:
        return [f"{m} {'<=' if k == 'max' else '>='} {b:g}" for m, k, b in self.bounds()]
