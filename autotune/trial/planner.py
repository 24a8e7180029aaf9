"""Memory planner: does a deployment fit the devices? Checked before every launch, so a config that
cannot fit is pruned with its reason instead of crashing a server (or the machine)."""

from __future__ import annotations

from dataclasses import dataclass, field

from autotune.config.settings import PlannerSettings
from autotune.trial.devices import Devices
from autotune.trial.geometry import ModelGeometry
from serving.config import DeploymentConfig

GIB = 2**30

DTYPE_BYTES: dict[str, float] = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
"""Bytes per element of activations, KV cache and unquantised weights."""
QUANTIZED_WEIGHT_BYTES: dict[str, float] = {
    "int8_dynamic": 1.0,
    "int8_weight_only": 1.0,
    "bnb_int8": 1.0,
    "int4_weight_only": 0.5,
    "bnb_nf4": 0.5,
}
"""Bytes per linear-layer weight after quantisation (scales are small and ignored)."""


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for one deployment; `reason` says why it cannot run when `fits` is False."""

    fits: bool
    reason: str | None
    weights_bytes: float
    """All weights of one replica (summed over its tp x pp ranks)."""
    kv_bytes: float
    """KV cache one replica allocates (its configured budget)."""
    need_bytes: float
    """What must fit on the tightest device (one GPU), or in RAM for all replicas on the CPU."""
    available_bytes: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Warnings that do not prune, e.g. a KV budget that forces preemption at full batch."""


def weight_bytes(config: DeploymentConfig, geometry: ModelGeometry) -> float:
    """Weights of one replica: embeddings at the dtype, linear layers (and lm_head) at the quantised size."""
    dtype_bytes = DTYPE_BYTES[config.precision.dtype]
    linear_bytes = QUANTIZED_WEIGHT_BYTES.get(config.precision.quantization, dtype_bytes)
    input_embedding = geometry.vocab_size * geometry.hidden_size
    lm_head = 0 if geometry.tied_embeddings else geometry.vocab_size * geometry.hidden_size
    linear = geometry.num_layers * geometry.linear_params_per_layer + lm_head
    return (input_embedding + geometry.norm_params) * dtype_bytes + linear * linear_bytes


def plan_memory(
    config: DeploymentConfig, geometry: ModelGeometry, devices: Devices, settings: PlannerSettings
) -> MemoryPlan:
    """Weights / (tp x pp) plus KV per rank against each GPU, or everything against RAM on the CPU."""
    parallel = config.parallel
    shards = parallel.tp * parallel.pp
    weights = weight_bytes(config, geometry)
    kv_budget = config.cache.kv_cache_memory_gb * GIB
    per_token = geometry.kv_bytes_per_token(DTYPE_BYTES[config.precision.dtype])
    overhead = settings.process_overhead_gb * GIB
    notes: list[str] = []

    one_sequence = config.model.max_model_len * per_token
    if kv_budget < one_sequence:
        tokens = int(kv_budget // per_token)
        reason = (
            f"cache.kv_cache_memory_gb={config.cache.kv_cache_memory_gb} holds {tokens} tokens, fewer than "
            f"model.max_model_len={config.model.max_model_len}: raise the budget to at least "
            f"{one_sequence / GIB:.3f} GiB"
        )
        return MemoryPlan(False, reason, weights, kv_budget, 0.0, 0.0)
    full_batch = config.scheduler.max_num_seqs * one_sequence
    if full_batch > kv_budget:
        notes.append(
            f"max_num_seqs x max_model_len needs {full_batch / GIB:.2f} GiB of KV, budget is "
            f"{kv_budget / GIB:.2f} GiB: full-length batches will preempt"
        )

    use_gpus = bool(devices.gpus) and config.device != "cpu"
    if use_gpus:
        smallest = min(g.memory_bytes for g in devices.gpus)
        total = settings.memory_limit_gb * GIB if settings.memory_limit_gb else smallest
        available = total * settings.memory_fraction
        free = [g.free_bytes for g in devices.gpus if g.free_bytes is not None]
        if free and not settings.memory_limit_gb:  # memory other processes hold is not ours to plan with
            available = min(available, min(free))
        need = (weights + kv_budget) / shards + overhead
        where = "per GPU"
    else:
        total = settings.memory_limit_gb * GIB if settings.memory_limit_gb else devices.ram_bytes
        available = total * settings.memory_fraction
        need = parallel.dp * (weights + kv_budget) + parallel.world_size * overhead
        where = "in RAM"
    if need > available:
        reason = (
            f"needs {need / GIB:.2f} GiB {where} (weights {weights / GIB:.2f} GiB / {shards} shard(s), "
            f"KV {kv_budget / GIB:.2f} GiB, x{parallel.dp} replica(s), {overhead / GIB:.2f} GiB per process) "
            f"but {available / GIB:.2f} GiB is usable: "
            "lower cache.kv_cache_memory_gb, quantise, or raise tp/pp"
        )
        return MemoryPlan(False, reason, weights, kv_budget, need, available, tuple(notes))
    return MemoryPlan(True, None, weights, kv_budget, need, available, tuple(notes))
