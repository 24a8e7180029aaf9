"""Serving backends: each turns a DeploymentConfig into a server command (see base.ServingBackend)."""

from __future__ import annotations

import importlib

from serving.backends.base import ServingBackend
from serving.config import ConfigError

_BACKENDS = {
    "builtin": ("serving.backends.builtin", "BuiltinBackend"),
    "vllm": ("serving.backends.vllm", "VLLMBackend"),
    "sglang": ("serving.backends.sglang", "SGLangBackend"),
}
"""backend name -> (module, class); modules are imported only when their backend is asked for."""


def get_backend(name: str) -> ServingBackend:
    """The backend for DeploymentConfig.backend == name."""
    if name not in _BACKENDS:
        raise ConfigError(f"backend={name!r} is unknown: choose one of {', '.join(map(repr, _BACKENDS))}")
    module_name, class_name = _BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ConfigError(
            f"backend={name!r} is not available in this installation ({module_name} is missing)"
        ) from None
    backend = getattr(module, class_name)()
    if not isinstance(backend, ServingBackend):
        raise TypeError(f"{module_name}.{class_name} is not a ServingBackend")
    return backend


__all__ = ["ServingBackend", "get_backend"]
