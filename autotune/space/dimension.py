"""One searched deployment key: its domain (choices or a numeric range) and when it is searched at all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna

from serving.config import ConfigError

Kind = Literal["categorical", "int", "float"]


@dataclass(frozen=True)
class Dimension:
    """One searched deployment key: its domain and the condition under which it is searched at all."""

    name: str
    kind: Kind
    choices: tuple[Any, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    machine: bool = False
    """Keep only the choices this machine runs (autotune.space.machine), decided when the study starts."""

    def is_active(self, params: Mapping[str, Any]) -> bool:
        """True when every `when` condition holds for the params sampled so far."""
        return all(key in params and params[key] in allowed for key, allowed in self.when.items())

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        """Whether a value lies in this dimension's domain (for seeds and conditions)."""
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        offset = (value - self.low) / self.step
        return abs(offset - round(offset)) < 1e-9

    def grid(self, max_points: int | None = None) -> list[Any]:
        """Every value (categorical, stepped int/float); `max_points` thins long ranges for planning."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            step = int(self.step or 1)
            values: list[Any] = list(range(int(self.low), int(self.high) + 1, step))
            if self.log and self.step is None:
                values = _log_points(int(self.low), int(self.high))
        elif self.step is not None:
            count = round((self.high - self.low) / self.step) + 1
            values = [self.low + i * self.step for i in range(count)]
        elif max_points is None:
            raise ConfigError(
                f"dimension {self.name}: a float range has no grid; give it a `step` or choices"
            )
        else:
            values = [self.low, self.high]
        if max_points is not None and len(values) > max_points:
            picks = {round(i * (len(values) - 1) / (max_points - 1)) for i in range(max_points)}
            values = [values[i] for i in sorted(picks)]
        return values


def _log_points(low: int, high: int) -> list[int]:
    """Powers of two between low and high, with both ends: the natural grid of a log-scale int."""
    points = {low, high}
    value = 1
    while value <= high:
        if value >= low:
            points.add(value)
        value *= 2
    return sorted(points)
