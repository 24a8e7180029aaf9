"""Optuna samplers by name. Constraints reach every sampler through trial.set_constraint (Optuna 5),
which NSGA-II, TPE and GP read; random and grid ignore them, as they should."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import optuna

from autotune.config.settings import StudySettings
from autotune.space.search_space import SearchSpace
from autotune.study.staged import Pick, StagedSampler


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler calls study.stop() once the grid is used up, which raises outside
    study.optimize: the study loop's ask/tell crashed on the last grid point. The loop stops on its own
    (repeats in a row, study.max_repeats), so this one only samples."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None


def make_sampler(
    settings: StudySettings, space: SearchSpace, pick: Pick | None = None
) -> optuna.samplers.BaseSampler:
    """`pick` (the best trial so far) is what the staged search fixes earlier stages to."""
    name, seed = settings.sampler, settings.seed
    if name == "staged":
        if pick is None:
            raise ValueError("study.sampler=staged needs a pick of the best trial so far")
        return StagedSampler(space, settings.n_trials, pick, seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=settings.population_size, seed=seed)
    if name == "tpe":
        with warnings.catch_warnings():  # multivariate and group are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                n_startup_trials=settings.n_startup_trials, multivariate=True, group=True, seed=seed
            )
    if name == "gp":
        return optuna.samplers.GPSampler(n_startup_trials=settings.n_startup_trials, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        # Conditional dimensions are in the grid too; combinations that differ only in an inactive one
        # map to one config, and the study's repeat check measures it once.
        return AskTellGridSampler(space.grid(), seed=seed)
    raise ValueError(f"study.sampler={name!r} is invalid: choose nsga2, tpe, gp, random, grid or staged")
