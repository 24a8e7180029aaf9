"""ServingBackend: how one serving engine turns a DeploymentConfig into a server process.

Call order (serving.launch.ServerProcess follows it; a new backend only fills in these methods):
  1. validate(config)                      -> ConfigError for knobs this engine lacks, before any process
  2. env(config, cpus)                     -> environment additions (thread counts, engine variables)
  3. command(config, port, config_path=..) -> argv of a server that listens on 127.0.0.1:port
  4. the launcher starts argv in its own process group, polls GET health_path until it answers 200
  5. the launcher stops the group with SIGTERM (SIGKILL after a timeout); the server must exit 0 on SIGTERM
Every backend must serve the same OpenAI API (/v1/completions, /v1/chat/completions with streaming and
stream_options.include_usage, /v1/models, /health, /metrics), so one contract test suite runs over all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from serving.config import DeploymentConfig


class ServingBackend(ABC):
    name: str
    """The value of DeploymentConfig.backend this class serves."""
    health_path: str = "/health"
    """GET path that answers 200 once the server takes requests."""

    @abstractmethod
    def validate(self, config: DeploymentConfig) -> None:
        """Raise ConfigError naming each config field this engine cannot honour (never ignore one)."""

    @abstractmethod
    def command(self, config: DeploymentConfig, port: int, *, config_path: Path | None = None) -> list[str]:
        """argv of the server. config_path, when given, is where the backend may write a file describing
        the deployment (the launcher puts it next to the log, so every trial keeps what it ran)."""

    def env(self, config: DeploymentConfig, cpus: Sequence[int] | None) -> dict[str, str]:
        """Environment additions; by default thread pools sized to the CPUs the server may use."""
        threads = str(len(cpus)) if cpus else str(len(_available_cpus()))
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}


def _available_cpus() -> set[int]:
    import os

    return os.sched_getaffinity(0)
