"""What the external engines (vLLM, SGLang) share: their own interpreter, extra flags, CPU binding, geometry.

These engines live in their own virtual environments (their torch pins clash with ours), so a backend
starts `<engine python> -m <entrypoint>`; the interpreter and any extra flags come from environment
variables read when the command is built, so `serving launch` and the tuner pick them up unchanged.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from serving.backends.base import ServingBackend
from serving.config import ConfigError, DeploymentConfig, ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout holding `serving/`; engine venvs made by scripts/ live next to it."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ExternalEngineBackend(ServingBackend):
    """A backend whose server is `<engine python> -m <entrypoint> <mapped flags> <extra flags>`.

    Subclasses set the class attributes below and write engine_problems(), engine_args() and env().
    """

    title: str
    """The engine's own spelling, for messages ("vLLM")."""

    python_env: str
    """Environment variable naming the engine's interpreter."""
    extra_args_env: str
    """The environment variable that once held extra flags: refused by name, they are `engine_args` now."""
    default_python: Path
    """The interpreter used when python_env is unset."""
    entrypoint: str
    """The module run with `python -m`."""
    log_levels: tuple[str, ...]
    log_level_flag: str
    """server.log_level must be one of log_levels, passed as this flag."""
    no_sjf: str
    """Why scheduler.queue_order=sjf is refused: what the engine's queue policies are instead."""

    def __init__(self, *, python: Path | None = None, extra: Sequence[str] | None = None) -> None:
        """python / extra override the config's engine_python / engine_args (tests, other tools)."""
        self._python = python
        self._extra = list(extra) if extra is not None else None

    @property
    def python(self) -> Path:
        """The interpreter when the config names none: $python_env, else the project's venv."""
        return self._python or engine_python(self.python_env, self.default_python)

    def python_for(self, config: DeploymentConfig) -> Path:
        if self._python is None and config.engine_python:
            return Path(config.engine_python).expanduser()
        return self.python

    def command(self, config: DeploymentConfig, port: int, *, config_path: Path | None = None) -> list[str]:
        """argv of the engine's server; config_path, when given, records the deployment it serves."""
        if config_path is not None:
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(config.to_yaml())
        mapped = self.engine_args(config, port)
        extra = extra_args(config, self.extra_args_env, self._extra)
        check_no_overlap(extra, mapped, self.name)
        return [str(self.python_for(config)), "-m", self.entrypoint, *mapped, *extra]

    def validate(self, config: DeploymentConfig) -> None:
        """Every knob the engine lacks, named in one ConfigError (both engines batch continuously)."""
        if config.backend != self.name:
            raise ConfigError(
                f"backend={config.backend!r} handed to the {self.title} backend; use get_backend()"
            )
        problems = []
        if config.scheduler.policy != "continuous":
            problems.append(
                f"scheduler.policy={config.scheduler.policy!r}: {self.title} only batches continuously "
                "(iteration-level); use scheduler.policy=continuous or backend=builtin"
            )
        if config.scheduler.queue_order == "sjf":
            problems.append(f"scheduler.queue_order='sjf': {self.no_sjf}")
        if config.server.log_level not in self.log_levels:
            problems.append(
                f"server.log_level={config.server.log_level!r}: {self.title}'s {self.log_level_flag} takes "
                f"{', '.join(self.log_levels)}"
            )
        if config.server.api_key is not None and self.api_key_env is None:
            problems.append(
                f"server.api_key: {self.title} takes its key only on its command line, where every local "
                "user reads it; use null (and a proxy that checks keys) or backend=builtin/vllm"
            )
        if config.server.request_timeout_s is not None:
            problems.append(
                f"server.request_timeout_s={config.server.request_timeout_s}: {self.title} has no "
                "per-request deadline; use null or backend=builtin"
            )
        problems += self.engine_problems(config)
        if problems:
            raise ConfigError(f"backend {self.name!r} cannot honour: " + "; ".join(problems))

    @abstractmethod
    def engine_problems(self, config: DeploymentConfig) -> list[str]:
        """What else this engine cannot honour, one message per field naming the fix."""

    @abstractmethod
    def engine_args(self, config: DeploymentConfig, port: int) -> list[str]:
        """The DeploymentConfig as the engine's flags (every field is here or refused by validate())."""


def engine_python(env_var: str, default: Path) -> Path:
    """The engine's interpreter: $env_var when set, else the project's venv for it."""
    value = os.environ.get(env_var)
    return Path(value).expanduser() if value else default


def require_executable(python: Path, engine: str, env_var: str, setup_hint: str) -> None:
    """Fail before launching when the engine's interpreter is missing (not as a FileNotFoundError later)."""
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise ConfigError(
            f"backend={engine!r}: no Python interpreter at {python}; {setup_hint} "
            f"or set engine_python (or {env_var}) to a python that has {engine} installed"
        )


def extra_args(config: DeploymentConfig, old_env_var: str, given: Sequence[str] | None) -> list[str]:
    """Extra engine flags: those given to the backend, else the config's engine_args, shell-split. The
    old environment variable is refused rather than ignored: flags nobody logged would change the result."""
    if os.environ.get(old_env_var):
        raise ConfigError(
            f"{old_env_var} is no longer read: extra engine flags are part of the deployment; set "
            f"engine_args={os.environ[old_env_var]!r} in the deployment (or --set engine_args=...) and "
            f"unset {old_env_var}"
        )
    if given is not None:
        return list(given)
    return shlex.split(config.engine_args)


def check_no_overlap(extra: Sequence[str], mapped: Iterable[str], engine: str) -> None:
    """Extra flags may add engine options, never override one the DeploymentConfig sets (a silent change)."""
    mapped_flags = {arg for arg in mapped if arg.startswith("--")}
    clashes = sorted({arg.split("=", 1)[0] for arg in extra if arg.startswith("--")} & mapped_flags)
    if clashes:
        raise ConfigError(
            f"backend={engine!r}: engine_args sets {', '.join(clashes)}, which the DeploymentConfig already "
            "maps; change the config field instead"
        )


def model_location(config: DeploymentConfig) -> str:
    """A local or shipped model directory as an absolute path, else the hub id as given."""
    local = config.model.resolve_path()
    return str(local.resolve()) if local is not None else config.model.path


def tokenizer_location(config: DeploymentConfig) -> str | None:
    """model.tokenizer resolved like model.path (local dir, shipped name, else hub id); None when unset."""
    if config.model.tokenizer is None:
        return None
    local = ModelConfig(path=config.model.tokenizer).resolve_path()
    return str(local.resolve()) if local is not None else config.model.tokenizer


def uses_cpu(config: DeploymentConfig) -> bool:
    """True when the engine will run on CPU: device=cpu, or device=auto on a machine NVML finds no GPU on."""
    if config.device == "cpu":
        return True
    if config.device == "cuda":
        return False
    return _gpu_count() == 0


@functools.cache
def _gpu_count() -> int:
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no library or driver: a machine without NVIDIA GPUs
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def rank_cpu_lists(config: DeploymentConfig, cpus: Sequence[int] | None) -> list[list[int]]:
    """The cores of each rank (dp x pp x tp ranks, in that order): contiguous equal shares of `cpus`.

    With fewer cores than ranks, ranks share cores only when parallel.oversubscribe is true.
    """
    available = sorted(cpus) if cpus else sorted(os.sched_getaffinity(0))
    ranks = config.parallel.world_size
    if len(available) < ranks:
        if not config.parallel.oversubscribe:
            raise ConfigError(
                f"parallel: {ranks} ranks (dp x tp x pp) but only {len(available)} CPU core(s) "
                f"{available}; lower dp/tp/pp or set parallel.oversubscribe=true"
            )
        return [[available[rank % len(available)]] for rank in range(ranks)]
    share = len(available) // ranks
    return [available[rank * share : (rank + 1) * share] for rank in range(ranks)]


def id_ranges(ids: Sequence[int]) -> str:
    """Core ids as the compact list OpenMP binding variables take: [0, 1, 2, 5] -> "0-2,5"."""
    parts: list[str] = []
    ordered = sorted(ids)
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def omp_bind_mask(config: DeploymentConfig, cpus: Sequence[int] | None) -> str:
    """The per-rank core lists joined by '|', as VLLM_CPU_OMP_THREADS_BIND / SGLANG_CPU_OMP_THREADS_BIND read
    them: "0-1" for one rank on two cores, "0|1" for two ranks."""
    return "|".join(id_ranges(group) for group in rank_cpu_lists(config, cpus))


def model_head_dim(config: DeploymentConfig) -> int | None:
    """The attention head size from a local config.json (None for a hub id not on disk)."""
    hf = _hf_config(config)
    if hf is None:
        return None
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def _hf_config(config: DeploymentConfig) -> dict[str, Any] | None:
    model_dir = config.model.resolve_path()
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    data: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    return data


def kv_bytes_per_token(config: DeploymentConfig) -> int:
    """KV bytes one token costs in one replica: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes."""
    hf = _hf_config(config)
    head_dim = model_head_dim(config)
    if hf is None or head_dim is None:
        raise ConfigError(
            f"model.path={config.model.path!r}: no local config.json to size the KV cache from; "
            "use a local model directory"
        )
    kv_heads = int(hf.get("num_key_value_heads", hf["num_attention_heads"]))
    return 2 * int(hf["num_hidden_layers"]) * kv_heads * head_dim * DTYPE_BYTES[config.precision.dtype]
