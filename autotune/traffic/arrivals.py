"""Precomputed open-loop arrival times (seconds from the start), so sending never waits on sampling."""

from __future__ import annotations

import numpy as np

from autotune.traffic.config import ArrivalConfig


def arrival_times(arrival: ArrivalConfig) -> np.ndarray:
    """Send offsets for the timed requests: gaps ~ Gamma(k, 1/(rate*k)) (k = 1: Poisson), or 1/rate.

    As vLLM's bench serve, the first request also waits one gap, and with `normalize` the gaps are rescaled
    so the last arrival lands at num_requests / rate. Bounded by duration_s, arrivals past it are dropped.
    """
    if arrival.closed:
        raise ValueError("arrival.kind=closed has no schedule: requests follow completions")
    count = arrival.request_count
    rng = np.random.default_rng([arrival.seed, 7])
    if arrival.kind == "constant":
        gaps = np.full(count, 1.0 / arrival.rate)
    else:
        shape = 1.0 if arrival.kind == "poisson" else arrival.burstiness
        gaps = rng.gamma(shape=shape, scale=1.0 / (arrival.rate * shape), size=count)
    times = np.cumsum(gaps)
    if arrival.normalize and arrival.kind != "constant" and times[-1] > 0:
        times *= (count / arrival.rate) / times[-1]
    if arrival.duration_s is not None:
        times = times[times <= arrival.duration_s]
    return times
