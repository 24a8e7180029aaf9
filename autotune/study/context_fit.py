"""The workload against the model's context, checked when the run config is composed: a request longer
than model.max_model_len is refused by the server with a 400, so a study whose workload overruns the
context would launch every trial only to fail it on its requests."""

from __future__ import annotations

import math

from autotune.traffic.config import LengthDistribution, WorkloadConfig
from serving.config import ConfigError, ModelConfig


def length_bound(dist: LengthDistribution) -> int | None:
    """The longest length autotune.traffic.workload.sample_lengths can draw (None: unbounded)."""
    if dist.dist == "constant":
        high: float = dist.mean
    elif dist.dist == "uniform":
        high = math.ceil(dist.mean * (1 + dist.range_ratio))
    else:
        high = math.inf
    if dist.max is not None:
        high = min(high, dist.max)
    return None if math.isinf(high) else max(int(high), dist.min, 1)


def check_workload_fits(workload: WorkloadConfig, model: ModelConfig) -> None:
    """ConfigError naming workload.input_len / output_len, model.max_model_len and the fix when the
    longest request (prefix + input + output) does not fit the context."""
    bounds = {}
    for key in ("input_len", "output_len"):
        bound = length_bound(getattr(workload, key))
        if bound is None:
            dist = getattr(workload, key).dist
            raise ConfigError(
                f"workload.{key} ({dist}) has no upper bound, so requests could exceed model.max_model_len="
                f"{model.max_model_len}: set workload.{key}.max"
            )
        bounds[key] = bound
    longest = workload.prefix_len + bounds["input_len"] + bounds["output_len"]
    if longest <= model.max_model_len:
        return
    spare_input = model.max_model_len - workload.prefix_len - bounds["output_len"]
    shorten = f"workload.input_len.max={spare_input}" if spare_input > 0 else "a shorter workload.output_len"
    raise ConfigError(
        f"workload {workload.name!r}: its longest request is {longest} tokens (workload.prefix_len "
        f"{workload.prefix_len} + workload.input_len up to {bounds['input_len']} + workload.output_len up to "
        f"{bounds['output_len']}) but model.max_model_len={model.max_model_len}, so the server would refuse "
        f"it: raise the context (deployment.model.max_model_len={_round_up(longest)}) or shorten the "
        f"workload ({shorten})"
    )


def _round_up(tokens: int) -> int:
    """The next multiple of 256 tokens: a context length people write."""
    return -(-tokens // 256) * 256
