"""The staged search (`study.sampler=staged`): layout first, then precision, then batch limits, then the
scheduler knobs, each stage searched with the earlier ones fixed at their best, as the tuning scripts
people write around vLLM do by hand.

The study's budget is split evenly over the stages the space has. Within a stage its dimensions are
sampled at random (a stage is a handful of trials, too few for a model); dimensions of earlier stages take
the values of the best measured trial so far (the export policy's pick; with none feasible, the trial
closest to the constraints); dimensions of later stages take an anchor: the DeploymentConfig default
when the space allows it, else the first seed's value, else the first choice (or the low end).
Seeds are measured first, as with every sampler, and count toward the first stages. A stage with fewer
deployments than its share of the budget ends early, once its samples only repeat measured ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

from autotune.config.settings import ExportSettings
from autotune.report.export import NoSelection, select
from autotune.report.objectives import Objectives
from autotune.report.pareto import candidates
from autotune.report.results import TrialRecord, load_records
from autotune.space.dimension import Dimension
from autotune.space.search_space import SearchSpace
from serving.config import DeploymentConfig

STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("layout", ("parallel.",)),
    ("precision", ("precision.", "model.compile")),
    (
        "batch limits",
        ("scheduler.max_num_seqs", "scheduler.max_num_batched_tokens", "scheduler.chunked_prefill", "cache."),
    ),
    ("scheduler", ("",)),
)
"""Stage name -> key prefixes, in search order; a key goes to the first stage one of whose prefixes it
starts with (the last stage takes the rest: policy, queue order, batch wait, attention kernel)."""

STALL_REPEATS = 3
"""A stage whose samples repeat measured deployments this many times in a row is used up: a small stage
(four layouts on two cores) would otherwise hold the study until study.max_repeats ends it."""

Pick = Callable[[Sequence[TrialRecord]], "TrialRecord | None"]
"""The best measured trial of a study so far (None before any)."""


def policy_pick(objectives: Objectives, export: ExportSettings) -> Pick:
    """The export policy's choice; with no trial feasible yet, the completed one nearest the bounds."""

    def pick(records: Sequence[TrialRecord]) -> TrialRecord | None:
        try:
            return select(records, objectives, export).record
        except NoSelection:
            done = candidates(records, feasible_only=False)
            return min(
                done, key=lambda r: (sum(max(v, 0.0) for v in r.constraints.values()), r.number), default=None
            )

    return pick


def stage_of(name: str) -> str:
    return next(stage for stage, prefixes in STAGES if name.startswith(prefixes))


class StagedSampler(optuna.samplers.BaseSampler):
    """Call order (Optuna's): before_trial fixes the trial's stage and the best trial so far; then
    sample_independent per dimension; relative sampling is not used."""

    def __init__(self, space: SearchSpace, n_trials: int, pick: Pick, seed: int | None = None) -> None:
        self.stages = [s for s, _ in STAGES if any(stage_of(d.name) == s for d in space.dimensions)]
        self.per_stage = max(1, math.ceil(n_trials / max(1, len(self.stages))))
        self.pick = pick
        self.anchors = {d.name: anchor(d, space.seeds) for d in space.dimensions}
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._skips = 0
        """Stages left early because they only repeated measured deployments."""
        self._last_skip = -1
        """The trial at which the last stage was left early: the next stage's repeats count from there."""
        self._plans: dict[int, tuple[int, Mapping[str, Any]]] = {}
        """trial number -> (its stage index, the best trial's params when it was asked)."""

    def stage(self, measured: int) -> int:
        return min(measured // self.per_stage + self._skips, len(self.stages) - 1)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        records = load_records(study)
        best = self.pick([r for r in records if r.measured])
        if trailing_repeats(records, trial.number, after=self._last_skip) >= STALL_REPEATS:
            self._skips += 1  # the stage has nothing new left: on to the next
            self._last_skip = trial.number
        self._plans[trial.number] = (
            self.stage(sum(r.measured for r in records)),
            best.params if best else {},
        )

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        current, best = self._plans.get(trial.number, (0, {}))
        own = self.stages.index(stage_of(param_name))
        if own == current or param_name not in self.anchors:
            return self._random.sample_independent(study, trial, param_name, param_distribution)
        if own < current and param_name in best:
            return best[param_name]
        return self.anchors[param_name]

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._plans.pop(trial.number, None)


def trailing_repeats(records: Sequence[TrialRecord], current: int, after: int = -1) -> int:
    """Repeats of measured deployments since the last launch and since trial `after` (pruned samples
    skipped over)."""
    count = 0
    for record in reversed(records):
        if record.number <= after:
            break
        if record.number == current or record.state in ("RUNNING", "WAITING") or record.state == "PRUNED":
            continue
        if record.repeat_of is None:
            break
        count += 1
    return count


def anchor(dim: Dimension, seeds: Sequence[Mapping[str, Any]]) -> Any:
    """A dimension's value before its stage is searched: the default, a seed's, or the domain's first."""
    default = DeploymentConfig().to_flat().get(dim.name)
    if default is not None and dim.contains(default):
        return default
    for seed in seeds:
        if dim.name in seed:
            return seed[dim.name]
    return dim.choices[0] if dim.kind == "categorical" else (int(dim.low) if dim.kind == "int" else dim.low)
