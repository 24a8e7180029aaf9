"""Named rules a search space can require of every sampled deployment (its `constraints:` list).

A rule returns None when the config is acceptable, else the reason it is not; such a trial is pruned
without launching. Rules are named rather than written as expressions so a typo is an error, not code.
"""

from __future__ import annotations

from collections.abc import Callable

from autotune.trial.devices import Devices
from autotune.trial.geometry import ModelGeometry
from serving.config import DeploymentConfig

Rule = Callable[[DeploymentConfig, ModelGeometry, Devices], "str | None"]


def world_size_within_devices(
    config: DeploymentConfig, geometry: ModelGeometry, devices: Devices
) -> str | None:
    """dp x tp x pp ranks must not exceed the GPUs (or CPU cores) unless parallel.oversubscribe is set."""
    parallel = config.parallel
    if parallel.oversubscribe or parallel.world_size <= devices.count:
        return None
    unit = "GPU(s)" if devices.gpus else "CPU core(s)"
    return (
        f"parallel.dp x tp x pp = {parallel.dp} x {parallel.tp} x {parallel.pp} = {parallel.world_size} "
        "ranks "
        f"but only {devices.count} {unit}: shrink the layout or set parallel.oversubscribe=true"
    )


def tp_divides_heads(config: DeploymentConfig, geometry: ModelGeometry, devices: Devices) -> str | None:
    """Tensor parallelism splits attention heads and KV heads evenly over the ranks."""
    tp = config.parallel.tp
    if geometry.num_heads % tp == 0 and geometry.num_kv_heads % tp == 0:
        return None
    return (
        f"parallel.tp={tp} does not divide the model's {geometry.num_heads} attention heads and "
        f"{geometry.num_kv_heads} KV heads: use a common divisor"
    )


def pp_within_layers(config: DeploymentConfig, geometry: ModelGeometry, devices: Devices) -> str | None:
    """Each pipeline stage needs at least one decoder layer."""
    pp = config.parallel.pp
    if pp <= geometry.num_layers:
        return None
    layers = geometry.num_layers
    return f"parallel.pp={pp} exceeds the model's {layers} layers: use at most {layers}"


RULES: dict[str, Rule] = {
    "world_size_within_devices": world_size_within_devices,
    "tp_divides_heads": tp_divides_heads,
    "pp_within_layers": pp_within_layers,
}
"""Every rule a search space may name."""
