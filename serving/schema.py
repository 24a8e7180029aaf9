"""Frozen dataclasses built from plain mappings: unknown keys and wrongly typed values are rejected by name.

DeploymentConfig's sections are built here from YAML, Hydra, search spaces and MLflow params alike, so a
misspelled knob or a string where a number belongs fails where it is written, never as a silent default.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from serving.dotted import unknown_key_message


class ConfigError(ValueError):
    """A deployment config that cannot be used; the message names the field and the fix."""


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested mappings ({"a.b": 1} -> {"a": {"b": 1}})."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is a value, not a section")
        node[leaf] = value
    return nested


def require(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {fix}")


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """get_type_hints evaluates every annotation string anew; a tuner builds thousands of configs."""
    return get_type_hints(cls)


def build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(unknown_key_message(f"{prefix}{key}", [f"{prefix}{n}" for n in names]))
        kwargs[key] = coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - dataclass signature errors are programming errors
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def coerce(hint: Any, value: Any, name: str) -> Any:
    """Check one value against its annotation; ints are accepted for floats, nothing else is converted."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return build(hint, value, prefix=f"{name}.")
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is invalid: choose one of {', '.join(map(repr, choices))}")
        return value
    if origin in (types.UnionType, typing.Union):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return coerce(inner, value, name)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is invalid: use true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} is invalid: use an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}={value!r} is invalid: use a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{name}={value!r} is invalid: use a string")
        return str(value)
    return value
