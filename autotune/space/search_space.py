"""SearchSpace: the parsed dimensions of a search_spaces/*.yaml file, sampled define-by-run.

Build one with autotune.space.parse.load_space; the file format is described there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autotune.space.dimension import Dimension
from serving.config import ConfigError, DeploymentConfig


@dataclass(frozen=True)
class SearchSpace:
    """A parsed, validated search space; build with load_space()."""

    path: Path
    description: str
    base: Mapping[str, Any]
    dimensions: tuple[Dimension, ...]
    constraints: tuple[str, ...]
    seeds: tuple[Mapping[str, Any], ...] = ()
    narrowed: tuple[str, ...] = ()
    """What was left out because this machine cannot run it (`machine: true` dimensions, their seeds)."""

    def dimension(self, name: str) -> Dimension:
        for dim in self.dimensions:
            if dim.name == name:
                return dim
        raise KeyError(name)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample the active dimensions in file order (define-by-run, so conditions are respected)."""
        params: dict[str, Any] = {}
        for dim in self.dimensions:
            if not dim.is_active(params):
                continue
            if dim.kind == "categorical":
                params[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
            elif dim.kind == "int":
                params[dim.name] = trial.suggest_int(
                    dim.name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log
                )
            else:
                params[dim.name] = trial.suggest_float(
                    dim.name, dim.low, dim.high, step=dim.step, log=dim.log
                )
        return params

    def active_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Drop values of dimensions whose condition does not hold (e.g. from a partial seed)."""
        kept: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.name in params and dim.is_active(kept):
                kept[dim.name] = params[dim.name]
        return kept

    def deployment(self, base: DeploymentConfig, params: Mapping[str, Any]) -> DeploymentConfig:
        """The base deployment with the sampled values applied (raises ConfigError on a bad combination)."""
        return base.replace(**dict(params)) if params else base

    def grid(self, max_points: int | None = None) -> dict[str, list[Any]]:
        return {dim.name: dim.grid(max_points) for dim in self.dimensions}

    def enumerate(self, max_points: int | None = None) -> Iterator[dict[str, Any]]:
        """Every distinct active combination of the grid, in order; conditional dims only where active."""
        seen: set[tuple[tuple[str, Any], ...]] = set()
        grid = self.grid(max_points)
        names = list(grid)
        for values in itertools.product(*(grid[n] for n in names)):
            params = self.active_params(dict(zip(names, values, strict=True)))
            key = tuple(sorted(params.items()))
            if key not in seen:
                seen.add(key)
                yield params

    def size(self) -> float:
        """Distinct configurations, or infinity when a float dimension has no step."""
        try:
            return float(sum(1 for _ in self.enumerate()))
        except ConfigError:
            return math.inf
