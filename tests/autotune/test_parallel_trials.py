"""`study.parallel_trials=2` on this 2-core machine: two real servers at once, each pinned to its own
core; SIGTERM stops both and records them as interrupted; the next run measures them again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from autotune.report import results as R
from tests.autotune.test_run_e2e import STILL_RUNNING, TINY, sigterm_when_ready

pytestmark = pytest.mark.slow

SPACE = (
    "dimensions:\n"
    "  scheduler.policy: {type: categorical, choices: [static, continuous]}\n"
    "  scheduler.max_num_seqs: {type: int, low: 2, high: 16}\n"
)


def _args(tmp_path: Path, name: str, n_trials: int) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return [
        *TINY,
        f"study.name={name}",
        f"study.n_trials={n_trials}",
        "study.parallel_trials=2",
        "tracking=none",
        f"search.space={space}",
    ]


def _trials(tmp_path: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{tmp_path / 'runs' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=storage).trials


def _overlap(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    assert a.datetime_start and a.datetime_complete and b.datetime_start and b.datetime_complete
    return a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete


def test_two_trials_run_at_once_on_disjoint_cores(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "run", "conf=chat", *_args(tmp_path, "two", 2)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    measured = [t for t in _trials(tmp_path, "two") if t.user_attrs.get(R.MEASURED)]
    assert len(measured) == 2 and all(t.state.name == "COMPLETE" for t in measured), run.stdout
    first, second = measured
    assert _overlap(first, second), "the two trials did not run at the same time"
    assert {first.user_attrs[R.DEVICES], second.user_attrs[R.DEVICES]} == {"cores 0", "cores 1"}


def test_sigterm_stops_both_running_trials_and_resume_measures_them(tmp_path: Path) -> None:
    args = ["conf=chat", *_args(tmp_path, "cut2", 2), *STILL_RUNNING]
    logs = [f"runs/cut2/trials/000{n}/server.log" for n in (0, 1)]
    code, output, survivors = sigterm_when_ready(args, tmp_path, logs)
    assert code == 130, output
    assert not survivors, f"servers outlived the run: {survivors}"
    cut = _trials(tmp_path, "cut2")
    assert [(t.state.name, t.user_attrs.get(R.RETRYABLE)) for t in cut] == [("FAIL", True)] * 2, output

    resumed = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "run", *args], cwd=tmp_path, capture_output=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout.decode(errors="replace")
    done = [
        t for t in _trials(tmp_path, "cut2") if t.user_attrs.get(R.MEASURED) and t.state.name == "COMPLETE"
    ]
    assert sorted(t.user_attrs[R.CONFIG_KEY] for t in done) == sorted(t.user_attrs[R.CONFIG_KEY] for t in cut)
