"""A study's trials read back as plain records: what the report, export, tracking and live view share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

# user_attrs keys the study loop writes on every trial
DEPLOYMENT = "deployment"
CONFIG_KEY = "config_key"
METRICS = "metrics"
REASON = "reason"
REPEAT_OF = "repeat_of"
MEASURED = "measured"
RETRYABLE = "retryable"
TRANSIENT = "transient"
DURATION = "duration_s"
TRIAL_DIR = "trial_dir"
OWNER = "owner"
DEVICES = "devices"
HEARTBEAT = "heartbeat"


@dataclass(frozen=True)
class TrialRecord:
    """One Optuna trial in the tuner's terms."""

    number: int
    state: str
    """COMPLETE, FAIL, PRUNED, RUNNING or WAITING (Optuna's TrialState names)."""
    params: dict[str, Any]
    """The sampled dimensions."""
    deployment: dict[str, Any]
    """The whole deployment, flattened to dotted keys (the MLflow params)."""
    metrics: dict[str, float]
    values: tuple[float, ...] | None
    constraints: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    repeat_of: int | None = None
    """Set when this trial reused the result of an earlier trial with the same deployment."""
    measured: bool = False
    """True when a server was launched for this trial."""
    duration_s: float | None = None
    trial_dir: str | None = None
    devices: str | None = None
    """Where the server ran, e.g. "cores 0-1" or "GPUs 0,1, cores 0-15"."""

    @property
    def feasible(self) -> bool:
        return all(value <= 0 for value in self.constraints.values())

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE" and self.values is not None

    @property
    def label(self) -> str:
        """The sampled values in a short form for tables and plots."""
        return ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in self.params.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def record_of(trial: FrozenTrial) -> TrialRecord:
    attrs = trial.user_attrs
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        params=dict(trial.params),
        deployment=dict(attrs.get(DEPLOYMENT) or {}),
        metrics={k: float(v) for k, v in (attrs.get(METRICS) or {}).items()},
        values=tuple(trial.values) if trial.state == TrialState.COMPLETE and trial.values else None,
        constraints=dict(trial.constraints),
        reason=attrs.get(REASON),
        repeat_of=attrs.get(REPEAT_OF),
        measured=bool(attrs.get(MEASURED, False)),
        duration_s=attrs.get(DURATION),
        trial_dir=attrs.get(TRIAL_DIR),
        devices=attrs.get(DEVICES),
    )


def load_records(study: optuna.Study) -> list[TrialRecord]:
    return [record_of(t) for t in study.get_trials(deepcopy=False)]


def distinct(records: list[TrialRecord]) -> list[TrialRecord]:
    """Trials that stand for their own configuration (repeats of an earlier trial left out)."""
    return [r for r in records if r.repeat_of is None]
