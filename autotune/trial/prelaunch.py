"""The pre-launch check of one sampled deployment, in the order a launch would meet the problems: the
space's named rules, what the serving side itself refuses at start-up (the builtin engine's
validate_parallel and check_precision_supported, every backend's validate), device placement and the
memory planner.

What fails here is pruned with the reason before any process starts: it costs no start-up time and no
share of `study.n_trials`, and `autotune plan` lists it. The serving validators are called as they are,
not re-implemented, so the tuner prunes exactly what the engine would refuse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from autotune.config.settings import PlannerSettings
from autotune.space.constraints import RULES
from autotune.trial.device_pool import DevicePool
from autotune.trial.devices import Devices
from autotune.trial.geometry import ModelGeometry
from autotune.trial.planner import MemoryPlan, plan_memory
from serving.backends import get_backend
from serving.config import ConfigError, DeploymentConfig


@dataclass(frozen=True)
class Machine:
    """What a trial is checked against: the model's shape and the devices."""

    geometry: ModelGeometry
    devices: Devices
    """All devices of the machine (layouts are checked against these)."""
    per_trial: Devices
    """One trial's share (the planner's memory when trials run at once)."""
    server_cpus: Sequence[int] | None = None
    """trial.server_cpus: the cores servers may use (None: all)."""


def check_deployment(
    config: DeploymentConfig, rules: Sequence[str], machine: Machine, planner: PlannerSettings
) -> tuple[str | None, MemoryPlan | None]:
    """Why this deployment cannot start here (None when it can), and the memory plan when one was made."""
    for rule in rules:
        reason = RULES[rule](config, machine.geometry, machine.devices)
        if reason:
            return f"{rule}: {reason}", None
    reason = serving_refusal(config, machine)
    if reason:
        return reason, None
    placement = DevicePool(machine.devices, cpus=machine.server_cpus).fits(config)
    if placement:
        return f"devices: {placement}", None
    plan = plan_memory(config, machine.geometry, machine.per_trial, planner)
    if not plan.fits:
        return f"memory: {plan.reason}", plan
    return None, plan


def serving_refusal(config: DeploymentConfig, machine: Machine) -> str | None:
    """What the serving side would refuse when the server starts, asked before it starts."""
    if config.backend == "builtin":
        # imported here: the quantisation module imports torch, which only checking needs
        from serving.engine.distributed.validate import validate_parallel
        from serving.engine.quantization import check_precision_supported

        devices = machine.devices
        try:
            validate_parallel(config, machine.geometry.config_fields(), devices.count, devices.kind)
        except ConfigError as err:
            return f"parallel layout: {err}"
        try:
            check_precision_supported(on_devices(config, devices))
        except ConfigError as err:
            return f"precision: {err}"
    try:
        get_backend(config.backend).validate(config)
    except ConfigError as err:
        return f"backend {config.backend}: {err}"
    return None


def on_devices(config: DeploymentConfig, devices: Devices) -> DeploymentConfig:
    """device=auto resolved as the tuner found the machine (NVML), so the check needs no CUDA runtime."""
    if config.device != "auto":
        return config
    return dataclasses.replace(config, device=devices.kind)
