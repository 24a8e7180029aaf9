"""Everything a study needs, built once from the run settings: space, base deployment, objectives,
model geometry, devices, storage and directories; plus the pre-launch check every trial passes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.config.settings import RunSettings
from autotune.quality.guard import QualityGuard, build_guard
from autotune.report.objectives import Objectives
from autotune.space.constraints import RULES
from autotune.space.parse import load_space
from autotune.space.search_space import SearchSpace
from autotune.trial.device_pool import DevicePool
from autotune.trial.devices import Devices, detect_devices
from autotune.trial.geometry import ModelGeometry, load_geometry
from autotune.trial.planner import MemoryPlan, plan_memory
from autotune.trial.runner import Traffic
from serving.backends import get_backend
from serving.config import ConfigError, DeploymentConfig, flatten


@dataclass(frozen=True)
class StudyContext:
    settings: RunSettings
    space: SearchSpace
    base: DeploymentConfig
    """DeploymentConfig defaults <- the space's base <- the run config's `deployment` section."""
    objectives: Objectives
    geometry: ModelGeometry
    devices: Devices
    run_dir: Path
    report_dir: Path
    storage_url: str
    traffic: Traffic
    """The workload, arrival, SLOs and client every trial uses, typed and checked once at start."""
    quality: QualityGuard | None = None
    """The quality guard every trial is probed by (None when quality.enabled is false)."""

    @property
    def name(self) -> str:
        return self.settings.study.name

    @property
    def devices_per_trial(self) -> Devices:
        """What the planner may give one trial: trials running at once split the RAM (each has its GPUs)."""
        share = self.devices.ram_bytes // self.settings.study.parallel_trials
        return dataclasses.replace(self.devices, ram_bytes=share)

    def check(self, config: DeploymentConfig) -> tuple[str | None, MemoryPlan | None]:
        """Why this deployment cannot run here (None when it can): space rules, backend, devices, memory."""
        for rule in self.space.constraints:
            reason = RULES[rule](config, self.geometry, self.devices)
            if reason:
                return f"{rule}: {reason}", None
        try:
            get_backend(config.backend).validate(config)
        except ConfigError as err:
            return f"backend {config.backend}: {err}", None
        placement = DevicePool(self.devices, cpus=self.settings.trial.server_cpus).fits(config)
        if placement:
            return f"devices: {placement}", None
        plan = plan_memory(config, self.geometry, self.devices_per_trial, self.settings.planner)
        if not plan.fits:
            return f"memory: {plan.reason}", plan
        return None, plan


def base_deployment(space: SearchSpace, overrides: dict[str, Any]) -> DeploymentConfig:
    """Space base, then the run config's fixed values; a key that is also a dimension is an error."""
    fixed = flatten(overrides or {})
    dims = {d.name for d in space.dimensions}
    clash = sorted(set(fixed) & dims)
    if clash:
        raise ConfigError(
            f"deployment.{clash[0]} is fixed in the run config but searched by {space.path}: "
            "remove the override, or remove the dimension from the space"
        )
    try:
        return DeploymentConfig().replace(**{**space.base, **fixed})
    except ConfigError as err:
        raise ConfigError(f"deployment: {err}") from None


def build_traffic(settings: RunSettings, base: DeploymentConfig) -> Traffic:
    """The run config's traffic sections as typed configs (traffic's own builders check them)."""
    from autotune.traffic.config import ArrivalConfig, ClientConfig, SLOConfig, WorkloadConfig

    workload = WorkloadConfig.from_config(settings.workload)
    local = base.model.resolve_path()
    if workload.tokenizer is None and local is not None:  # the client tokenises as the server does
        workload = dataclasses.replace(workload, tokenizer=str(base.model.tokenizer or local))
    return Traffic(
        workload=workload,
        arrival=ArrivalConfig.from_config(settings.arrival),
        slo=SLOConfig.from_config(settings.slo) if settings.slo else None,
        client=ClientConfig.from_config(settings.client or None),
    )


def build_context(settings: RunSettings, *, devices: Devices | None = None) -> StudyContext:
    space = load_space(settings.search.space)
    base = base_deployment(space, settings.deployment)
    study = settings.study
    run_dir = (Path(study.runs_dir) / study.name).resolve()
    traffic = build_traffic(settings, base)
    quality = build_guard(settings.quality, base, traffic.workload, run_dir, settings.trial.startup_timeout_s)
    objectives = Objectives(settings.objectives, tuple(quality.bounds()) if quality else ())
    report_dir = (Path(study.reports_dir) / study.name).resolve()
    storage = study.storage or f"sqlite:///{run_dir / 'study.db'}"
    return StudyContext(
        settings=settings,
        space=space,
        base=base,
        objectives=objectives,
        geometry=load_geometry(base.model),
        devices=devices or detect_devices(base.device),
        run_dir=run_dir,
        report_dir=report_dir,
        storage_url=storage,
        traffic=traffic,
        quality=quality,
    )
