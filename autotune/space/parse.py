"""Declarative search spaces (search_spaces/*.yaml): dimensions over DeploymentConfig's dotted keys.

A file has these sections; everything else is rejected by name:
    extends:     another space (name or path) this file changes: base and dimensions entries update
                 its entries by key, the other sections replace its sections when given
    description: one line
    base:        {dotted.key: value}   deployment values every trial shares (the dimensions override them)
    dimensions:  {dotted.key: {type: categorical|int|float, choices | low/high [step] [log], [when]}}
                 `when: {other.key: value-or-list}` makes a dimension conditional on earlier ones;
                 `machine: true` keeps only the choices this machine runs (autotune.space.machine)
    constraints: [rule names from autotune.space.constraints.RULES]
    seeds:       [{dotted.key: value}]  configs measured first (partial; the sampler fills the rest)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin

import yaml

from autotune.config.paths import SEARCH_SPACES_DIR
from autotune.space.constraints import RULES
from autotune.space.dimension import Dimension, Kind
from autotune.space.machine import MACHINE_KEYS
from autotune.space.search_space import SearchSpace
from serving.config import ConfigError, DeploymentConfig, check_field, closest_key, field_types, flatten

SECTIONS = ("description", "base", "dimensions", "constraints", "seeds")
"""What a parsed file holds; a file may also start with `extends: <space>` (read_space folds it in)."""
DIMENSION_KEYS = {"type", "choices", "low", "high", "step", "log", "when", "machine"}


FIELD_TYPES = field_types()


def _fits(key: str, value: Any, where: str, fail: Any) -> None:
    """The deployment schema's own type check, reported at the place in the file."""
    try:
        check_field(key, value)
    except ConfigError as err:
        raise fail(where, str(err)) from None


def _base_kind(hint: Any) -> type | None:
    """The numeric type behind an annotation, for int/float dimensions (None when not numeric)."""
    if get_origin(hint) in (types.UnionType, typing.Union):
        inner = [o for o in get_args(hint) if o is not type(None)]
        return _base_kind(inner[0]) if len(inner) == 1 else None
    return hint if hint in (int, float) else None


def resolve_space_path(name_or_path: str | Path) -> Path:
    """`chat` -> search_spaces/chat.yaml; a path to a YAML file is used as given."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"search space file {candidate} does not exist")
        return candidate
    shipped = SEARCH_SPACES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))
    raise ConfigError(
        f"search.space={name_or_path!r}: no such space; use one of {known} or a path to a .yaml"
    )


def load_space(name_or_path: str | Path) -> SearchSpace:
    path = resolve_space_path(name_or_path)
    return parse_space(read_space(path), path)


def read_space(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping with its `extends:` parent folded in (parents first, any depth)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data
    parent = str(data.pop("extends"))
    beside = path.parent / parent  # a relative .yaml path is read beside the file that names it
    parent_path = resolve_space_path(beside if parent.endswith((".yaml", ".yml")) else parent)
    if parent_path.resolve() in seen:
        raise ConfigError(f"{path}: extends: {parent_path} extends this file again; break the loop")
    return merge_spaces(read_space(parent_path, (*seen, path.resolve())), data)


def merge_spaces(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """A variant written as changes: `base` and `dimensions` entries update the parent's by key (a
    dimension keeps its place), the other sections replace the parent's when given."""
    merged = {**parent, **child}
    for section in ("base", "dimensions"):
        if isinstance(parent.get(section), Mapping) and isinstance(child.get(section), Mapping):
            merged[section] = {**parent[section], **child[section]}
    return merged


def parse_space(data: Any, path: Path) -> SearchSpace:
    """Validate every section; each error names the file, the key and how to fix it."""

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {problem}")

    if not isinstance(data, Mapping):
        raise fail("(top level)", f"expected a mapping with sections {', '.join(SECTIONS)}")
    for key in data:
        if key not in SECTIONS:
            raise fail(
                str(key), f"unknown section{_hint(str(key), SECTIONS)}; sections are {', '.join(SECTIONS)}"
            )
    base = _parse_base(data.get("base") or {}, fail)
    raw_dims = data.get("dimensions") or {}
    if not isinstance(raw_dims, Mapping):
        raise fail("dimensions", "expected a mapping of dotted deployment keys to dimension specs")
    dims: list[Dimension] = []
    for name, spec in raw_dims.items():
        dims.append(_parse_dimension(str(name), spec, dims, fail))
    constraints = data.get("constraints") or []
    if not isinstance(constraints, list):
        raise fail("constraints", f"expected a list of rule names from {sorted(RULES)}")
    for rule in constraints:
        if rule not in RULES:
            raise fail(
                f"constraints.{rule}", f"unknown rule{_hint(str(rule), RULES)}; rules are {sorted(RULES)}"
            )
    space = SearchSpace(
        path=path,
        description=str(data.get("description") or ""),
        base=base,
        dimensions=tuple(dims),
        constraints=tuple(constraints),
    )
    seeds = _parse_seeds(data.get("seeds") or [], space, fail)
    try:
        DeploymentConfig().replace(**dict(base))
    except ConfigError as err:
        raise fail("base", f"{err}") from None
    return dataclasses.replace(space, seeds=seeds)


def _hint(key: str, known: Sequence[str] | Mapping[str, Any]) -> str:
    close = closest_key(key, known)
    return f" (did you mean {close!r}?)" if close else ""


def _check_key(key: str, where: str, fail: Any) -> Any:
    if key not in FIELD_TYPES:
        raise fail(where, f"{key!r} is not a deployment key{_hint(key, FIELD_TYPES)}; see serving/config.py")
    return FIELD_TYPES[key]


def _parse_base(raw: Any, fail: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise fail("base", "expected a mapping of dotted deployment keys to values")
    flat = flatten(raw)
    for key, value in flat.items():
        _check_key(key, f"base.{key}", fail)
        _fits(key, value, f"base.{key}", fail)
    return flat


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def _parse_dimension(name: str, spec: Any, earlier: list[Dimension], fail: Any) -> Dimension:
    where = f"dimensions.{name}"
    hint = _check_key(name, where, fail)
    if name == "server.port":
        raise fail(where, "the port is chosen per trial; remove this dimension")
    if not isinstance(spec, Mapping):
        raise fail(where, "expected a mapping with `type` and `choices` or `low`/`high`")
    for key in spec:
        if key not in DIMENSION_KEYS:
            raise fail(f"{where}.{key}", f"unknown option{_hint(str(key), sorted(DIMENSION_KEYS))}")
    kind = spec.get("type")
    when = _parse_when(spec.get("when") or {}, earlier, f"{where}.when", fail)
    machine = spec.get("machine", False)
    if not isinstance(machine, bool):
        raise fail(f"{where}.machine", "use true or false")
    if machine and (kind != "categorical" or name not in MACHINE_KEYS):
        raise fail(
            f"{where}.machine",
            f"only categorical dimensions of {', '.join(MACHINE_KEYS)} are narrowed to the machine",
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{where}.choices", "give a non-empty list of values")
        for value in choices:
            _fits(name, value, f"{where}.choices", fail)
        if len(set(map(repr, choices))) != len(choices):
            raise fail(f"{where}.choices", "remove the repeated values")
        extra = set(spec) - {"type", "choices", "when", "machine"}
        if extra:
            raise fail(f"{where}.{sorted(extra)[0]}", "only int and float dimensions take low/high/step/log")
        return Dimension(name, "categorical", choices=tuple(choices), when=when, machine=machine)
    if kind in ("int", "float"):
        return _parse_range(name, kind, spec, hint, when, fail)
    raise fail(f"{where}.type", f"{kind!r} is not a dimension type; use categorical, int or float")


def _parse_range(
    name: str, kind: Kind, spec: Mapping[str, Any], hint: Any, when: Any, fail: Any
) -> Dimension:
    where = f"dimensions.{name}"
    numeric = _base_kind(hint)
    if numeric is None or (kind == "float" and numeric is int) or (kind == "int" and numeric is float):
        raise fail(
            f"{where}.type", f"{kind} does not fit the field's type {_type_name(hint)}; use categorical"
        )
    if "choices" in spec:
        raise fail(
            f"{where}.choices", f"a {kind} dimension takes low/high; use type: categorical for choices"
        )
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), bool(spec.get("log", False))
    number = int if kind == "int" else (int, float)
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number):
            raise fail(f"{where}.{key}", f"give a{'n integer' if kind == 'int' else ' number'}")
    low, high = cast(float, low), cast(float, high)
    if low > high:
        raise fail(where, f"low <= high must hold, but got (low={low}, high={high})")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
        raise fail(f"{where}.step", "give a positive number")
    if log and step is not None:
        raise fail(f"{where}.log", "log scale and step cannot be combined; drop one")
    if log and low <= 0:
        raise fail(f"{where}.low", f"log scale needs low > 0, got {low}")
    for bound in (low, high):
        _fits(name, bound, where, fail)
        if not _field_accepts(name, bound):
            raise fail(where, f"{bound!r} is not a valid {name}")
    return Dimension(name, kind, low=low, high=high, step=step, log=log, when=when)


def _field_accepts(name: str, value: Any) -> bool:
    """Whether the deployment schema's own checks accept this value for the key (on a default config)."""
    try:
        DeploymentConfig.from_flat({name: value})
    except ConfigError as err:
        return name not in str(err).split("=")[0]
    return True


def _parse_when(raw: Any, earlier: list[Dimension], where: str, fail: Any) -> dict[str, tuple[Any, ...]]:
    if not isinstance(raw, Mapping):
        raise fail(where, "expected a mapping {earlier.dimension: value or [values]}")
    by_name = {d.name: d for d in earlier}
    when: dict[str, tuple[Any, ...]] = {}
    for key, value in raw.items():
        if key not in by_name:
            raise fail(
                f"{where}.{key}", f"conditions refer to dimensions declared above; known: {list(by_name)}"
            )
        allowed = tuple(value) if isinstance(value, list) else (value,)
        dim = by_name[key]
        for item in allowed:
            if not dim.contains(item):
                raise fail(f"{where}.{key}", f"{item!r} is outside that dimension's domain")
        when[str(key)] = allowed
    return when


def _parse_seeds(raw: Any, space: SearchSpace, fail: Any) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(raw, list):
        raise fail("seeds", "expected a list of {dimension: value} mappings")
    seeds = []
    for index, seed in enumerate(raw):
        where = f"seeds[{index}]"
        if not isinstance(seed, Mapping):
            raise fail(where, "expected a mapping {dimension: value}")
        for key, value in seed.items():
            try:
                dim = space.dimension(str(key))
            except KeyError:
                names = [d.name for d in space.dimensions]
                raise fail(
                    f"{where}.{key}", f"not a dimension of this space{_hint(str(key), names)}"
                ) from None
            if not dim.contains(value):
                raise fail(f"{where}.{key}", f"{value!r} is outside the dimension's domain")
        seeds.append(dict(seed))
    return tuple(seeds)
