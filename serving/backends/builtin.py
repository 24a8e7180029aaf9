"""The builtin engine's backend: `python -m serving.cli serve --config <deploy yaml> --port N`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from serving.backends.base import ServingBackend
from serving.config import ConfigError, DeploymentConfig
from serving.engine.compile_support import check_compile
from serving.paths import pythonpath_with_package


class BuiltinBackend(ServingBackend):
    name = "builtin"

    def validate(self, config: DeploymentConfig) -> None:
        """Every DeploymentConfig field is a builtin-engine knob but the external engine's two."""
        if config.backend != self.name:
            raise ConfigError(f"backend={config.backend!r} handed to the builtin backend; use get_backend()")
        for key in ("engine_args", "engine_python"):
            if getattr(config, key):
                raise ConfigError(
                    f"{key}={getattr(config, key)!r}: the builtin engine takes no external engine's "
                    f"{'flags' if key == 'engine_args' else 'interpreter'}; remove it or use "
                    "backend=vllm/sglang"
                )
        check_compile(config)

    def command(self, config: DeploymentConfig, port: int, *, config_path: Path | None = None) -> list[str]:
        """With config_path the full config is written there; without, the fields that differ from the
        defaults go on the command line as --set overrides (the same config either way)."""
        base = [sys.executable, "-m", "serving.cli", "serve"]
        if config_path is not None:
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(config.to_yaml())
            return [*base, "--config", str(config_path), "--port", str(port)]
        defaults = DeploymentConfig().to_flat()
        sets: list[str] = []
        for key, value in config.to_flat().items():
            if key != "server.port" and value != defaults[key]:
                sets += ["--set", f"{key}={yaml_scalar(value)}"]
        return [*base, *sets, "--port", str(port)]

    def env(self, config: DeploymentConfig, cpus: Sequence[int] | None) -> dict[str, str]:
        return {**super().env(config, cpus), "PYTHONPATH": pythonpath_with_package()}


def yaml_scalar(value: object) -> str:
    """A value as `--set` reads it back (strings that look like numbers stay quoted)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("...").strip()
