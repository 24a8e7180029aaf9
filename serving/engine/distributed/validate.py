"""Checks of a parallel layout against the model and the machine, before any rank starts.

The engine calls it (validate_for_launch) before it spawns ranks; the tuner prunes layouts with its own
rules (autotune/space/constraints.py).
Every error names the field and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from serving.config import ConfigError, DeploymentConfig

PIPELINE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Decoder-only families whose `model.model.{embed_tokens, layers, norm, rotary_emb}` layout the pipeline
stages rely on (serving.engine.distributed.pipeline)."""


def model_geometry(model_config: Mapping[str, Any] | Any) -> tuple[int, int, int, str]:
    """(attention heads, KV heads, layers, model_type) from a config.json mapping or a PretrainedConfig."""

    def get(key: str) -> Any:
        if isinstance(model_config, Mapping):
            return model_config.get(key)
        return getattr(model_config, key, None)

    heads = get("num_attention_heads")
    layers = get("num_hidden_layers")
    if not isinstance(heads, int) or not isinstance(layers, int):
        raise ConfigError(
            "model.path: its config.json lacks num_attention_heads/num_hidden_layers, so the parallel "
            "layout cannot be checked; use parallel.tp=1 and parallel.pp=1 for this model"
        )
    kv_heads = get("num_key_value_heads")
    return heads, kv_heads if isinstance(kv_heads, int) else heads, layers, str(get("model_type") or "")


def validate_parallel(
    config: DeploymentConfig,
    model_config: Mapping[str, Any] | Any,
    num_devices: int,
    device_type: str = "cpu",
) -> None:
    """Raise ConfigError when config.parallel cannot run this model on num_devices CPU cores or GPUs."""
    par = config.parallel
    heads, kv_heads, layers, model_type = model_geometry(model_config)
    if heads % par.tp or kv_heads % par.tp:
        raise ConfigError(
            f"parallel.tp={par.tp} must divide the model's {heads} attention heads and {kv_heads} KV heads: "
            f"use one of {[d for d in range(1, heads + 1) if heads % d == 0 and kv_heads % d == 0]}"
        )
    if par.pp > layers:
        raise ConfigError(
            f"parallel.pp={par.pp} exceeds the model's {layers} decoder layers: use at most {layers}"
        )
    if par.tp > 1 and par.pp > 1:
        raise ConfigError(
            f"parallel.tp={par.tp} with parallel.pp={par.pp}: the builtin engine runs tensor or pipeline "
            "parallelism within a replica, not both; use one of them and parallel.dp for more ranks"
        )
    if par.pp > 1 and model_type not in PIPELINE_MODEL_TYPES:
        raise ConfigError(
            f"parallel.pp={par.pp}: pipeline stages support model types {', '.join(PIPELINE_MODEL_TYPES)}, "
            f"this model is {model_type!r}; use parallel.pp=1"
        )
    if par.tp > 1 and config.precision.quantization != "none":
        raise ConfigError(
            f"precision.quantization={config.precision.quantization!r} with parallel.tp={par.tp}: AutoTP "
            "shards nn.Linear layers only; use parallel.tp=1 or precision.quantization=none"
        )
    unit = "GPU(s)" if device_type == "cuda" else "CPU core(s)"
    if par.world_size > num_devices:
        if device_type == "cuda":
            raise ConfigError(
                f"parallel.dp x tp x pp = {par.world_size} ranks but {num_devices} {unit}: every rank needs "
                "its own GPU (parallel.oversubscribe applies to CPU cores only); shrink the layout"
            )
        if not par.oversubscribe:
            raise ConfigError(
                f"parallel.dp x tp x pp = {par.dp} x {par.tp} x {par.pp} = {par.world_size} ranks but only "
                f"{num_devices} {unit}: shrink the layout or set parallel.oversubscribe=true"
            )


def read_model_config(config: DeploymentConfig) -> dict[str, Any]:
    """config.json of the model as a mapping (no transformers import: the launcher uses this)."""
    from serving.engine.model_loader import resolve_model_dir

    path = resolve_model_dir(config.model.path) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path={config.model.path!r}: cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.path={config.model.path!r}: {path} is not a JSON object")
    return data


def local_devices(config: DeploymentConfig) -> tuple[int, str]:
    """(count, "cuda" | "cpu"): GPUs torch sees when the config runs on CUDA, else this process's cores."""
    from serving.engine.model_loader import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda":
        import torch

        return torch.cuda.device_count(), "cuda"
    return len(os.sched_getaffinity(0)), "cpu"


def validate_for_launch(config: DeploymentConfig) -> None:
    """validate_parallel against this machine and the model's config.json (a no-op for dp=tp=pp=1)."""
    if config.parallel.world_size == 1:
        return
    count, kind = local_devices(config)
    validate_parallel(config, read_model_config(config), count, kind)
