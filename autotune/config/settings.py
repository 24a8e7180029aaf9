"""Structured schemas for the composed run config: every section is checked, unknown keys rejected by name.

Hydra composes conf/<name>.yaml; OmegaConf merges it onto these dataclasses (so a misspelled key is an
error naming it) and builds the objects. MISSING marks what a config must set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from autotune.quality.settings import QualitySettings
from serving.config import ConfigError

SAMPLERS = ("nsga2", "tpe", "gp", "random", "grid", "staged")
DIRECTIONS = ("maximize", "minimize")
EXPORT_POLICIES = ("max_throughput_within_slo", "knee")
TRACKING_BACKENDS = ("mlflow", "none")
LIVE_MODES = ("auto", "on", "off")


def _choose(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is invalid: choose one of {', '.join(choices)}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid: use a positive number")


@dataclass
class SearchSettings:
    space: str = MISSING
    """A file in search_spaces/ by bare name (`chat`), or a path to a space YAML."""


@dataclass
class StudySettings:
    name: str = MISSING
    """Study name: the same name resumes the same study (finished trials are not measured again)."""
    n_trials: int = 10
    """Configurations to measure in total (resumed trials count; pruned and repeated configs do not)."""
    sampler: str = "nsga2"
    """nsga2 | tpe (multivariate) | gp | random | grid | staged (layout, precision, batch limits, then
    scheduler knobs, each stage with the earlier ones fixed at their best: autotune/study/staged.py)."""
    seed: int = 0
    """Sampler seed, so a study is repeatable."""
    population_size: int = 6
    """NSGA-II generation size (small budgets want small generations)."""
    n_startup_trials: int = 6
    """TPE/GP: random trials before the model-based sampler takes over."""
    warm_start: int = 0
    """Measure the N deployments an analytical estimate ranks best first, after the seeds (0: off);
    autotune/study/warm_start.py. CPU only: the estimate uses this CPU's measured bandwidth and GEMM rates."""
    storage: str | None = None
    """Optuna storage URL; null = sqlite:///<run dir>/study.db; any SQLAlchemy URL (postgresql://...)."""
    runs_dir: str = "runs"
    """Each study's working files go to <runs_dir>/<name>/ (server logs, records, the default storage)."""
    reports_dir: str = "reports"
    """report.html, plots and best.yaml go to <reports_dir>/<name>/."""
    max_repeats: int = 30
    """Stop after this many samples in a row that repeat a measured config: the space is exhausted."""
    live: str = "auto"
    """Live terminal view: auto (when stdout is a terminal) | on | off."""
    heartbeat_s: float = 30.0
    """Running trials refresh a heartbeat this often. A RUNNING trial silent for 4x as long (its worker
    died, on any machine) is failed as retryable by a live worker (checked before every trial) and
    re-measured."""
    parallel_trials: int = 1
    """Trials measured at once, each on its own GPUs (or its own share of the CPU cores); a trial waits
    until its dp x tp x pp devices are free. On a CPU-only machine concurrent trials also share memory
    bandwidth and the load generator's cores, so 1 gives the cleanest numbers there."""

    def __post_init__(self) -> None:
        _choose("study.sampler", self.sampler, SAMPLERS)
        _choose("study.live", self.live, LIVE_MODES)
        if self.n_trials < 0:
            raise ConfigError(f"study.n_trials={self.n_trials} is invalid: use 0 or more")
        _positive("study.heartbeat_s", self.heartbeat_s)
        if self.parallel_trials < 1:
            raise ConfigError(
                f"study.parallel_trials={self.parallel_trials} is invalid: use 1 or more (trials at once)"
            )
        if self.warm_start < 0:
            raise ConfigError(f"study.warm_start={self.warm_start} is invalid: use 0 (off) or a count")
        if self.population_size < 2:
            raise ConfigError(f"study.population_size={self.population_size} is invalid: use at least 2")
        if self.name != MISSING and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"study.name={self.name!r} is invalid: use letters, digits, '.', '_' or '-'")


@dataclass
class ObjectivesSettings:
    directions: dict[str, str] = MISSING
    """Objectives in order: a metric of the benchmark summary -> maximize | minimize."""
    constraints: dict[str, Any] = field(default_factory=dict)
    """Feasibility: metric -> upper bound (a trial over any bound is infeasible); null disables one."""
    min_constraints: dict[str, Any] = field(default_factory=dict)
    """Feasibility: metric -> lower bound (e.g. a throughput floor); null disables one."""

    def __post_init__(self) -> None:
        if self.directions == MISSING:  # the schema's own default, before a config is merged in
            return
        if not self.directions:
            raise ConfigError("objectives.directions is empty: name at least one metric to optimise")
        for metric, direction in self.directions.items():
            _choose(f"objectives.directions.{metric}", direction, DIRECTIONS)
        for section in ("constraints", "min_constraints"):
            for metric, bound in getattr(self, section).items():
                if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)):
                    raise ConfigError(
                        f"objectives.{section}.{metric}={bound!r} is invalid: use a number or null"
                    )

    def bounds(self) -> list[tuple[str, str, float]]:
        """Active constraints as (metric, 'max' | 'min', bound)."""
        upper = [(m, "max", float(b)) for m, b in self.constraints.items() if b is not None]
        lower = [(m, "min", float(b)) for m, b in self.min_constraints.items() if b is not None]
        return upper + lower


@dataclass
class TrackingSettings:
    backend: str = "mlflow"
    """mlflow | none."""
    uri: str | None = None
    """MLflow tracking URI; null = sqlite:///<current directory>/mlflow.db."""
    experiment: str = MISSING
    """MLflow experiment holding the study's parent run and one child run per trial."""
    artifact_root: str | None = None
    """Where a new experiment stores artifacts; null = mlartifacts/ beside a sqlite store."""

    def __post_init__(self) -> None:
        _choose("tracking.backend", self.backend, TRACKING_BACKENDS)


@dataclass
class TrialSettings:
    startup_timeout_s: float = 180.0
    """Time for a server to answer /health before the trial fails."""
    benchmark_timeout_s: float = 900.0
    """Time for the whole benchmark; past it the trial fails as `no progress`."""
    stall_timeout_s: float = 30.0
    """No token received for this long while the benchmark runs: the server is hung and the trial fails
    at once (a SIGSTOP'd or deadlocked server would otherwise hold it until the client time-outs). Keep
    it well above the longest gap between arrivals (1 / arrival.rate) and the slowest first token."""
    stop_timeout_s: float = 15.0
    """SIGTERM grace before SIGKILL when stopping a server."""
    max_failed_fraction: float = 0.1
    """A trial whose failed requests exceed this share of all requests fails."""
    server_cpus: list[int] | None = None
    """CPU cores for the server (taskset); null = every core this process may use."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the server process."""

    def __post_init__(self) -> None:
        _positive("trial.startup_timeout_s", self.startup_timeout_s)
        _positive("trial.benchmark_timeout_s", self.benchmark_timeout_s)
        _positive("trial.stall_timeout_s", self.stall_timeout_s)
        _positive("trial.stop_timeout_s", self.stop_timeout_s)
        if not 0 <= self.max_failed_fraction <= 1:
            raise ConfigError(f"trial.max_failed_fraction={self.max_failed_fraction} is invalid: use 0..1")


@dataclass
class ExportSettings:
    policy: str = "max_throughput_within_slo"
    """max_throughput_within_slo: the highest throughput among trials meeting every constraint;
    knee: the front point nearest the ideal point after scaling each objective to [0, 1]."""
    throughput_metric: str = "output_throughput"
    """The metric max_throughput_within_slo maximises."""
    output: str | None = None
    """Where best.yaml goes; null = <reports_dir>/<study>/best.yaml."""
    remeasure: int = 3
    """Fresh launches of the selected deployment, measured as its trial was, before best.yaml is written
    (its median and interval go into best.yaml); 0 copies the trial's numbers unchecked."""
    remeasure_contenders: int = 2
    """Trials tied with the selection on the deciding metric that are re-measured beside it (the best
    first), so the choice among them is made on fresh launches too; 0 re-measures the selection alone."""
    contender_repeats: int = 1
    """Fresh launches of each contender, interleaved with the selection's."""

    def __post_init__(self) -> None:
        _choose("export.policy", self.policy, EXPORT_POLICIES)
        if self.remeasure < 0:
            raise ConfigError(f"export.remeasure={self.remeasure} is invalid: use 0 (off) or more launches")
        if self.remeasure_contenders < 0:
            raise ConfigError(
                f"export.remeasure_contenders={self.remeasure_contenders} is invalid: use 0 (none) or more"
            )
        if self.contender_repeats < 1:
            raise ConfigError(f"export.contender_repeats={self.contender_repeats} is invalid: use 1 or more")


@dataclass
class PlannerSettings:
    """Headroom the planner keeps; the `planner` section of the run config (a mutable dataclass, as
    OmegaConf's structured-config merge needs)."""

    memory_fraction: float = 0.9
    """Share of the device memory (free RAM, or each GPU's total) trials may use."""
    process_overhead_gb: float = 0.6
    """Runtime memory per server process beyond weights and KV (Python, torch, tokenizer, buffers)."""
    memory_limit_gb: float | None = None
    """Plan against this much memory instead of what the devices report (to plan for another machine)."""

    def __post_init__(self) -> None:
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"planner.memory_fraction={self.memory_fraction} is invalid: use (0, 1]")
        if self.process_overhead_gb < 0:
            raise ConfigError(f"planner.process_overhead_gb={self.process_overhead_gb} is invalid: use >= 0")
        if self.memory_limit_gb is not None and self.memory_limit_gb <= 0:
            raise ConfigError(f"planner.memory_limit_gb={self.memory_limit_gb} is invalid: use > 0 or null")


@dataclass
class RunSettings:
    """The whole composed run config (`autotune run conf=chat --cfg` prints it).

    `deployment` and the traffic sections stay plain containers here because their typed configs
    (serving's DeploymentConfig, autotune.traffic.config's) are frozen and check themselves, which
    OmegaConf's structured merge cannot build; build_context turns them into those types once, at start
    (StudyContext.base and StudyContext.traffic), so a bad value fails before anything is launched.
    """

    deployment: dict[str, Any] = field(default_factory=dict)
    """Fixed deployment values (model/ and backend/ groups land here); the search space varies the rest."""
    search: SearchSettings = field(default_factory=SearchSettings)
    workload: Any = MISSING
    """Traffic shape: autotune.traffic.config.WorkloadConfig (conf/workload/)."""
    arrival: Any = MISSING
    """Arrival process: autotune.traffic.config.ArrivalConfig (conf/arrival/)."""
    slo: Any = None
    """Per-request SLOs for goodput: autotune.traffic.config.SLOConfig (conf/slo/)."""
    capacity: Any = field(default_factory=dict)
    """The load search per trial: autotune.traffic.config.CapacityConfig (conf/capacity/)."""
    client: Any = field(default_factory=dict)
    """Load-generator settings: autotune.traffic.config.ClientConfig (defaults suit one local server)."""
    objectives: ObjectivesSettings = field(default_factory=ObjectivesSettings)
    study: StudySettings = field(default_factory=StudySettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    trial: TrialSettings = field(default_factory=TrialSettings)
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)
    """The quality guard (autotune/quality): probe, reference and bounds; conf/quality/default.yaml."""
