"""Samplers by name under the study loop's ask/tell."""

from __future__ import annotations

from pathlib import Path

import optuna

from autotune.config.settings import StudySettings
from autotune.space.parse import parse_space
from autotune.study.samplers import make_sampler


def test_the_grid_sampler_survives_its_last_point_under_ask_and_tell(tmp_path: Path) -> None:
    space = parse_space(
        {"dimensions": {"scheduler.policy": {"type": "categorical", "choices": ["request", "continuous"]}}},
        tmp_path / "s.yaml",
    )
    study = optuna.create_study(sampler=make_sampler(StudySettings(name="s", sampler="grid"), space))
    for _ in range(3):  # one past the grid: Optuna's own sampler raised from study.stop() here
        trial = study.ask()
        space.suggest(trial)
        study.tell(trial, 1.0)
