"""Bootstrap 95% intervals of a load point's figures, resampled from its request records.

A figure that decides something (a percentile, a throughput, the SLO attainment) is one draw of a noisy
process; the percentile bootstrap over requests says how far it could move with the same deployment and
load. Requests are resampled whole (all of a request's values move together), seeded, and vectorised with
numpy so a thousand resamples of a few hundred requests take milliseconds."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from autotune.traffic.config import SLOConfig
from autotune.traffic.metrics import is_good, tpot
from autotune.traffic.records import RequestRecord

CONFIDENCE = 0.95
RESAMPLES = 1000
_QUANTILES = (("median", 50.0), ("p90", 90.0), ("p99", 99.0))


def row_percentile(values: np.ndarray, q: float) -> np.ndarray:
    """Each row's q-th percentile over its non-NaN entries (linear interpolation, as numpy's default);
    NaN for a row with none. Much faster than np.nanpercentile on many short rows."""
    ordered = np.sort(values, axis=1)  # NaN sorts last
    valid = np.sum(~np.isnan(values), axis=1)
    position = q / 100.0 * np.maximum(valid - 1, 0)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, np.maximum(valid - 1, 0))
    low_values = np.take_along_axis(ordered, lower[:, None], axis=1)[:, 0]
    high_values = np.take_along_axis(ordered, upper[:, None], axis=1)[:, 0]
    out = low_values + (high_values - low_values) * (position - lower)
    return np.where(valid > 0, out, np.nan)


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) of bootstrap samples: the central `confidence` share (NaN samples ignored)."""
    tail = (1.0 - confidence) / 2.0 * 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: no completed request in a resample
        low, high = np.nanpercentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def intervals(
    records: Sequence[RequestRecord],
    slo: SLOConfig | None,
    duration_s: float,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """{<key>_ci95_low, <key>_ci95_high} for SLO attainment, throughputs and TTFT/TPOT/E2EL percentiles.

    Throughputs are per second of the load point's duration, which resampling does not change."""
    if not records:
        return {}
    goals = slo.as_dict() if slo is not None else {}
    ok = np.array([r.success for r in records])
    nan = float("nan")
    columns = {
        "ttft": np.array([r.ttft if r.success else nan for r in records]),
        "tpot": np.array([tpot(r) if r.success and r.output_tokens > 1 else nan for r in records]),
        "e2el": np.array([r.latency if r.success else nan for r in records]),
    }
    good = np.array([r.success and is_good(r, goals) for r in records], dtype=float)
    tokens = np.array([r.output_tokens if r.success else 0 for r in records], dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(records), size=(resamples, len(records)))
    duration = max(duration_s, 1e-9)
    samples = {
        "slo_attainment": good[draws].mean(axis=1),
        "output_throughput": tokens[draws].sum(axis=1) / duration,
        "request_throughput": ok[draws].sum(axis=1) / duration,
    }
    for kind, values in columns.items():
        resampled = values[draws] * 1000.0
        for name, q in _QUANTILES:
            samples[f"{name}_{kind}_ms"] = row_percentile(resampled, q)
    out: dict[str, float] = {}
    for key, values in samples.items():
        out[f"{key}_ci95_low"], out[f"{key}_ci95_high"] = percentile_interval(values)
    return out
