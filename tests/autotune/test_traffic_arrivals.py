"""Arrival schedules: Poisson and gamma gaps pass Kolmogorov-Smirnov tests, constant is exact, bounds hold."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from autotune.traffic.arrivals import arrival_times
from autotune.traffic.config import ArrivalConfig


@pytest.mark.parametrize("normalize", [False, True])
def test_poisson_gaps_are_exponential(normalize: bool) -> None:
    rate = 8.0
    times = arrival_times(ArrivalConfig(kind="poisson", rate=rate, num_requests=4000, normalize=normalize))
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.01
    if normalize:  # vLLM's rescaling: the last arrival lands at n / rate
        assert times[-1] == pytest.approx(4000 / rate)


def test_poisson_is_rejected_against_a_wrong_rate() -> None:
    """The KS test above can fail: the same gaps against twice the rate are rejected."""
    times = arrival_times(ArrivalConfig(kind="poisson", rate=8.0, num_requests=4000, normalize=False))
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert stats.kstest(gaps, "expon", args=(0, 1 / 16.0)).pvalue < 1e-6


@pytest.mark.parametrize("k", [0.3, 4.0])
def test_gamma_gaps_have_shape_burstiness(k: float) -> None:
    rate = 5.0
    times = arrival_times(
        ArrivalConfig(kind="gamma", rate=rate, burstiness=k, num_requests=4000, normalize=False)
    )
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert stats.kstest(gaps, "gamma", args=(k, 0, 1 / (rate * k))).pvalue > 0.01
    assert np.mean(gaps) == pytest.approx(1 / rate, rel=0.1)


def test_constant_and_duration_bounds() -> None:
    times = arrival_times(ArrivalConfig(kind="constant", rate=4.0, num_requests=None, duration_s=2.5))
    np.testing.assert_allclose(times, [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5])
    capped = arrival_times(ArrivalConfig(kind="poisson", rate=10.0, num_requests=1000, duration_s=3.0))
    assert len(capped) < 1000 and capped.max() <= 3.0


def test_same_seed_same_schedule() -> None:
    a = ArrivalConfig(kind="poisson", rate=3.0, num_requests=50, seed=7)
    np.testing.assert_array_equal(arrival_times(a), arrival_times(a))
    other = ArrivalConfig(kind="poisson", rate=3.0, num_requests=50, seed=8)
    assert not np.array_equal(arrival_times(a), arrival_times(other))


def test_closed_loop_has_no_schedule() -> None:
    with pytest.raises(ValueError, match="closed"):
        arrival_times(ArrivalConfig(kind="closed", concurrency=2, num_requests=4))
