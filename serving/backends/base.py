"""ServingBackend: how one serving engine turns a DeploymentConfig into a server process.

Call order (serving.launch.ServerProcess follows it; a new backend only fills in these methods):
  1. validate(config)                      -> ConfigError for knobs this engine lacks, before any process
  2. env(config, cpus)                     -> environment additions (thread counts, engine variables);
                                              process_env() adds them and the API key (by environment)
  3. command(config, port, config_path=..) -> argv of a server that listens on 127.0.0.1:port
  4. the launcher starts argv in its own process group, polls GET health_path until it answers 200
  5. the launcher stops the group with SIGTERM (SIGKILL after a timeout); the server must exit 0 on SIGTERM
Every backend must serve the same OpenAI API (/v1/completions, /v1/chat/completions with streaming and
stream_options.include_usage, /v1/models, /health, /metrics), so one contract test suite runs over all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

from serving.config import API_KEY_ENV, DeploymentConfig


class ServingBackend(ABC):
    name: str
    """The value of DeploymentConfig.backend this class serves."""
    health_path: str = "/health"
    """GET path that answers 200 once the server takes requests."""
    api_key_env: str | None = API_KEY_ENV
    """The variable the engine's server reads its API key from; None: it takes none by environment
    (validate() then refuses server.api_key: a key on a command line is readable by every local user)."""

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

    def process_env(
        self,
        config: DeploymentConfig,
        cpus: Sequence[int] | None,
        base: Mapping[str, str],
        api_key: str | None,
    ) -> dict[str, str]:
        """The server's whole environment: base, env(), and exactly `api_key` (None: no key at all, even
        when base carries one)."""
        env = {**base, **self.env(config, cpus)}
        env.pop(API_KEY_ENV, None)
        if self.api_key_env is not None:
            env.pop(self.api_key_env, None)
            if api_key is not None:
                env[self.api_key_env] = api_key
        return env


def _available_cpus() -> set[int]:
    import os

    return os.sched_getaffinity(0)
