"""The warm start (`study.warm_start=N`): the N deployments the analytical estimate ranks best are
measured first, right after the space's seeds; the study's sampler takes over from there.

Candidates are the space's grid over the knobs the estimate models (layout, precision, scheduling level
and batch limit, KV budget; int and float ranges thinned to a few points), with every other knob at the
staged search's anchor. Deployments the pre-launch check refuses are left out. The estimate
(autotune/trial/estimate.py) predicts the default study's three objectives; candidates predicted to
carry the nominal rate come first, in order of their predicted Pareto rank (Optuna's non-domination
sort), each rank from the highest predicted capacity per device down.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.study._multi_objective import _fast_non_domination_rank

from autotune.space.search_space import SearchSpace
from autotune.study.staged import anchor
from autotune.trial.estimate import Estimate, Shape, estimate
from autotune.trial.rates import MachineRates, NoRate, rates_for_study
from serving.config import ConfigError, DeploymentConfig

if TYPE_CHECKING:
    from autotune.study.context import StudyContext
    from autotune.trial.runner import Traffic

MODELED = (
    "parallel.dp",
    "parallel.tp",
    "parallel.pp",
    "precision.",
    "scheduler.policy",
    "scheduler.max_num_seqs",
    "cache.kv_cache_memory_gb",
)
"""Keys the estimate reads; other knobs do not change its prediction, so they stay at their anchor."""
GRID_POINTS = 4
"""Points per int or float range (log ranges: powers of two, as the space's own grid)."""

Estimator = Callable[[DeploymentConfig], Estimate]
Check = Callable[[DeploymentConfig], "str | None"]


def candidate_space(space: SearchSpace) -> SearchSpace:
    """The space with every knob the estimate does not model fixed at its anchor."""
    dims = []
    for dim in space.dimensions:
        if dim.name.startswith(MODELED):
            dims.append(dim)
        else:
            dims.append(dataclasses.replace(dim, kind="categorical", choices=(anchor(dim, space.seeds),)))
    return dataclasses.replace(space, dimensions=tuple(dims))


def rank(
    space: SearchSpace, base: DeploymentConfig, estimator: Estimator, check: Check
) -> list[tuple[dict[str, Any], Estimate]]:
    """Every launchable candidate with its estimate, best predicted first."""
    scored: list[tuple[dict[str, Any], Estimate]] = []
    for params in candidate_space(space).enumerate(GRID_POINTS):
        try:
            config = space.deployment(base, params)
        except ConfigError:
            continue
        if check(config) is not None:
            continue
        try:
            scored.append((params, estimator(config)))
        except NoRate:  # its format did not run in the measurement: not a warm-start candidate
            continue
    return order(scored)


def order(scored: Sequence[tuple[dict[str, Any], Estimate]]) -> list[tuple[dict[str, Any], Estimate]]:
    """Predicted to carry the nominal rate first, then by predicted Pareto rank; within a rank one
    candidate per layout and precision in turn (highest predicted capacity first), so a short warm start
    spreads over the choices the estimate is least sure about instead of N near-copies of one."""
    if not scored:
        return []
    losses = np.array([[-e.capacity_rps_per_device, _finite(e.ttft_ms), e.memory_mb] for _, e in scored])
    carried = np.array([e.carries_nominal for _, e in scored])
    ranks = _fast_non_domination_rank(losses, penalty=np.where(carried, 0.0, 1.0))
    by_capacity = sorted(
        range(len(scored)),
        key=lambda i: (not carried[i], int(ranks[i]), -scored[i][1].capacity_rps_per_device, i),
    )
    turn: dict[tuple[Any, ...], int] = {}
    position: dict[int, tuple[bool, int, int]] = {}
    for i in by_capacity:
        group = (not carried[i], int(ranks[i]), _family(scored[i][0]))
        turn[group] = turn.get(group, -1) + 1
        position[i] = (bool(not carried[i]), int(ranks[i]), turn[group])
    keyed = sorted(by_capacity, key=lambda i: position[i])  # stable: capacity order within a turn
    return [scored[i] for i in keyed]


def _family(params: Mapping[str, Any]) -> tuple[Any, ...]:
    """Layout and precision: what a round-robin within one predicted rank spreads over."""
    return tuple(v for k, v in sorted(params.items()) if k.startswith(("parallel.", "precision.")))


def _finite(value: float) -> float:
    return value if np.isfinite(value) else 1e12


def warm_points(
    ranked: Sequence[Mapping[str, Any]], count: int, seeds: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The first `count` ranked candidates that no seed already covers (seeds are measured anyway)."""
    picked: list[dict[str, Any]] = []
    for params in ranked:
        if len(picked) >= count:
            break
        if any(all(params.get(k) == v for k, v in seed.items()) for seed in seeds):
            continue
        picked.append(dict(params))
    return picked


def shape_of(traffic: Traffic) -> Shape:
    """The estimate's view of a study's traffic: mean lengths, nominal rate, SLOs in seconds."""
    workload, slo = traffic.workload, traffic.slo
    return Shape(
        prompt_tokens=workload.prefix_len + workload.input_len.mean,
        output_tokens=workload.output_len.mean,
        nominal_rps=traffic.arrival.rate,
        tpot_slo_s=slo.tpot_ms / 1000 if slo and slo.tpot_ms else None,
        ttft_slo_s=slo.ttft_ms / 1000 if slo and slo.ttft_ms else None,
    )


def study_ranking(
    ctx: StudyContext, rates: MachineRates | None = None
) -> list[tuple[dict[str, Any], Estimate]]:
    """The study's space ranked by the estimate, with this machine's rates (measured once per study and
    kept in runs/<study>/machine_rates.json, so a resumed study ranks the same way)."""
    if ctx.devices.gpus:
        raise ConfigError(
            "study.warm_start: the estimate is calibrated on CPU cores only (memory bandwidth and GEMM "
            "rates of this CPU); set study.warm_start=0 on a GPU node"
        )
    if rates is None:
        rates = rates_for_study(ctx.run_dir / "machine_rates.json", [1, ctx.devices.count])
    shape = shape_of(ctx.traffic)

    def estimator(config: DeploymentConfig) -> Estimate:
        return estimate(config, ctx.geometry, rates, ctx.devices, shape, ctx.settings.planner)

    return rank(ctx.space, ctx.base, estimator, lambda config: ctx.check(config)[0])
