"""An analytical estimate of a deployment's objectives, before launching it: the warm start's ranking.

A decode step of a rank reads its share of the weights and of the batch's KV cache (bytes against the
measured memory bandwidth) and multiplies them by the batch (FLOPs against the measured GEMM rate of its
weight format); the slower of the two plus a fixed per-step overhead is the step time (the roofline).
From it:

- layout: a rank holds weights / (tp x pp) and runs with cores / (dp x tp x pp) threads; tp ranks work
  on one step together (plus an all-reduce per layer), pp stages one after the other on the same batch
  (no overlap assumed), dp replicas each serve their share of the traffic;
- capacity: the largest batch within `max_num_seqs` whose step meets the TPOT SLO, b requests per
  (output tokens x step + b prefills); request-level scheduling is batch 1; per device = / world size;
- TTFT at the nominal rate: a prefill plus a step (static batching: the batch wait plus half a running
  batch), stretched by 1 / (1 - utilisation); not carried (infinite) when a request arriving just after
  a static batch started would wait out the whole batch past the TTFT SLO. Only as good as the step
  time: on 2026-12-07 (2-core Xeon) steps came out ~4x faster than measured, so static batching still
  ranked in summarisation's first four picks and then missed the SLO (docs/benchmarks.md);
- memory: the planner's need (weights and KV of every replica plus a process overhead per rank).

Absolute numbers are rough (the engine's Python, the scheduler and the client are not modelled); what
the warm start needs is the order, and bench/replay.py reports its Spearman correlation with the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.config.settings import PlannerSettings
from autotune.trial.devices import Devices
from autotune.trial.geometry import ModelGeometry
from autotune.trial.planner import DTYPE_BYTES, plan_memory, weight_bytes
from autotune.trial.rates import MachineRates
from serving.config import DeploymentConfig

STEP_OVERHEAD_S = 0.003
"""Python, scheduling and sampling per step (3-4 ms measured for the 57M model: docs/ARCHITECTURE)."""
ALLREDUCE_S = 50e-6
"""One tensor-parallel all-reduce between ranks on one host (shared memory: tens of microseconds)."""


@dataclass(frozen=True)
class Shape:
    """The traffic the estimate serves: mean lengths, the nominal rate and the per-request SLOs."""

    prompt_tokens: float
    output_tokens: float
    nominal_rps: float
    tpot_slo_s: float | None = None
    ttft_slo_s: float | None = None


@dataclass(frozen=True)
class Estimate:
    """Predicted objectives of one deployment (the default study's, in its units)."""

    capacity_rps: float
    capacity_rps_per_device: float
    ttft_ms: float
    """At the nominal rate; infinite when the nominal rate exceeds the capacity."""
    memory_mb: float

    @property
    def carries_nominal(self) -> bool:
        return self.ttft_ms != float("inf")


def weight_kind(config: DeploymentConfig) -> str:
    """The GEMM that runs the linear layers: the quantisation's, else the dtype's."""
    quantization = config.precision.quantization
    return config.precision.dtype if quantization == "none" else quantization


def step_seconds(
    config: DeploymentConfig,
    geometry: ModelGeometry,
    rates: MachineRates,
    threads: int,
    batch: int,
    tokens: float,
) -> float:
    """One decode step of `batch` sequences with `tokens` of context each, over the whole layout."""
    parallel = config.parallel
    shards = parallel.tp * parallel.pp
    kv_bytes = batch * tokens * geometry.kv_bytes_per_token(DTYPE_BYTES[config.precision.dtype])
    read = (weight_bytes(config, geometry) + kv_bytes) / shards
    linear = (
        geometry.num_layers * geometry.linear_params_per_layer + geometry.vocab_size * geometry.hidden_size
    )
    flops = 2 * linear * batch / shards
    rank = max(read / rates.bandwidth(threads), flops / rates.gemm(weight_kind(config), threads))
    if parallel.tp > 1:
        rank += 2 * geometry.num_layers * ALLREDUCE_S
    return parallel.pp * rank + STEP_OVERHEAD_S


def prefill_seconds(
    config: DeploymentConfig, geometry: ModelGeometry, rates: MachineRates, threads: int, tokens: float
) -> float:
    """One prompt's forward pass: compute-bound, spread over tp ranks, stage after stage over pp."""
    parallel = config.parallel
    linear = geometry.num_layers * geometry.linear_params_per_layer
    flops = 2 * linear * tokens / parallel.tp
    return flops / rates.gemm(weight_kind(config), threads) + STEP_OVERHEAD_S


def estimate(
    config: DeploymentConfig,
    geometry: ModelGeometry,
    rates: MachineRates,
    devices: Devices,
    shape: Shape,
    planner: PlannerSettings,
) -> Estimate:
    """Predicted capacity, TTFT at the nominal rate and memory of one deployment on these devices."""
    parallel = config.parallel
    world = parallel.dp * parallel.tp * parallel.pp
    threads = max(1, devices.count // world) if not devices.gpus else 1
    context = shape.prompt_tokens + shape.output_tokens / 2
    prefill = prefill_seconds(config, geometry, rates, threads, shape.prompt_tokens)
    limit = config.scheduler.max_num_seqs if config.scheduler.policy != "request" else 1
    best_rate, best_step = 0.0, step_seconds(config, geometry, rates, threads, 1, context)
    for batch in range(1, limit + 1):
        step = step_seconds(config, geometry, rates, threads, batch, context)
        if shape.tpot_slo_s is not None and batch > 1 and step + prefill > shape.tpot_slo_s:
            break
        rate = batch / (shape.output_tokens * step + batch * prefill)
        if rate > best_rate:
            best_rate, best_step = rate, step
    capacity = best_rate * parallel.dp
    utilisation = shape.nominal_rps / capacity if capacity > 0 else float("inf")
    wait, worst_wait = best_step, best_step
    if config.scheduler.policy == "static":  # a new request waits for the running batch to finish
        worst_wait = config.scheduler.batch_wait_ms / 1000 + shape.output_tokens * best_step
        wait = config.scheduler.batch_wait_ms / 1000 + shape.output_tokens * best_step / 2
    ttft = (prefill + wait) / (1 - utilisation) if utilisation < 1 else float("inf")
    if shape.ttft_slo_s is not None and prefill + worst_wait > shape.ttft_slo_s:
        ttft = float("inf")  # the unluckiest arrivals miss the TTFT SLO even on an idle server
    memory = plan_memory(config, geometry, devices, planner).need_bytes
    return Estimate(capacity, capacity / world, ttft * 1000, memory / 2**20)
