"""Everything a study needs, built once from the run settings: space, base deployment, objectives,
model geometry, devices, storage and directories; plus the pre-launch check every trial passes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.config.settings import RunSettings
from autotune.quality.guard import QualityGuard, build_guard
from autotune.report.objectives import Objectives, check_metric_name
from autotune.space.machine import narrow_to_machine
from autotune.space.parse import load_space
from autotune.space.search_space import SearchSpace
from autotune.study.context_fit import check_workload_fits
from autotune.trial.devices import Devices, detect_devices
from autotune.trial.geometry import ModelGeometry, load_geometry
from autotune.trial.planner import MemoryPlan
from autotune.trial.prelaunch import Machine, check_deployment
from autotune.trial.runner import Traffic
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

    @property
    def machine(self) -> Machine:
        return Machine(self.geometry, self.devices, self.devices_per_trial, self.settings.trial.server_cpus)

    def check(self, config: DeploymentConfig) -> tuple[str | None, MemoryPlan | None]:
        """Why this deployment cannot start here (None when it can); see autotune.trial.prelaunch."""
        return check_deployment(config, self.space.constraints, self.machine, self.settings.planner)


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
    from autotune.traffic.config import ArrivalConfig, CapacityConfig, ClientConfig, SLOConfig, WorkloadConfig

    workload = WorkloadConfig.from_config(settings.workload)
    local = base.model.resolve_path()
    if workload.tokenizer is None and local is not None:  # the client tokenises as the server does
        workload = dataclasses.replace(workload, tokenizer=str(base.model.tokenizer or local))
    arrival = ArrivalConfig.from_config(settings.arrival)
    slo = SLOConfig.from_config(settings.slo) if settings.slo else None
    capacity = CapacityConfig.from_config(settings.capacity or None)
    if capacity.enabled:
        CapacityConfig.check_traffic(arrival, slo)
    return Traffic(
        workload=workload,
        arrival=arrival,
        slo=slo,
        client=ClientConfig.from_config(settings.client or None),
        capacity=capacity if capacity.enabled else None,
    )


def build_context(settings: RunSettings, *, devices: Devices | None = None) -> StudyContext:
    space = load_space(settings.search.space)
    base = base_deployment(space, settings.deployment)
    study = settings.study
    run_dir = (Path(study.runs_dir) / study.name).resolve()
    report_dir = (Path(study.reports_dir) / study.name).resolve()
    storage = study.storage or f"sqlite:///{run_dir / 'study.db'}"
    traffic = build_traffic(settings, base)
    check_workload_fits(traffic.workload, base.model)
    quality = build_guard(settings.quality, base, traffic.workload, run_dir, settings.trial.startup_timeout_s)
    objectives = Objectives(settings.objectives, tuple(quality.bounds()) if quality else ())
    if settings.export.policy == "max_throughput_within_slo":  # metric names checked before any launch
        check_metric_name(settings.export.throughput_metric, "export.throughput_metric")
    devices = devices or detect_devices(base.device)
    return StudyContext(
        settings=settings,
        space=narrow_to_machine(space, devices),
        base=base,
        objectives=objectives,
        geometry=load_geometry(base.model),
        devices=devices,
        run_dir=run_dir,
        report_dir=report_dir,
        storage_url=storage,
        traffic=traffic,
        quality=quality,
    )
