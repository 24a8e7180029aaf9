"""Ctrl-C once, Ctrl-C twice and SIGTERM to `autotune run` and `autotune worker`: the server is stopped
(checked by pid), the trial recorded as interrupted, the MLflow parent run ended KILLED; the same command
resumes and measures only what is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from autotune.commands.session import sigterm_as_interrupt
from autotune.report import results as R
from tests.autotune.test_run_e2e import TINY

SPACE = (
    "dimensions:\n  scheduler.policy: {type: categorical, choices: [request, static, continuous]}\n"
    "  scheduler.max_num_seqs: {type: int, low: 2, high: 16}\n"
)


def test_only_the_first_signal_interrupts(capsys: pytest.CaptureFixture[str]) -> None:
    with sigterm_as_interrupt() as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)  # while servers are being stopped: must not raise
        os.kill(os.getpid(), signal.SIGTERM)
    assert capsys.readouterr().err.count("still stopping the servers") == 2


def signal_when_ready(
    command: list[str], cwd: Path, server_log: Path, signals: list[signal.Signals]
) -> tuple[int, str, list[int]]:
    """Start `command`, send `signals` (0.3 s apart) once its server says ready; (exit code, output,
    pids of its descendants still alive after it exited)."""
    proc = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not (server_log.exists() and "ready" in server_log.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, "the server never got ready"
        time.sleep(0.3)
    descendants = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert descendants
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.3)
    output = proc.communicate(timeout=300)[0].decode(errors="replace")  # the report: slow on a busy machine
    alive = [
        pid
        for pid in descendants
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    return proc.returncode, output, alive


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "signals"),
    [
        ("run", [signal.SIGINT]),
        ("run", [signal.SIGINT, signal.SIGINT]),
        ("run", [signal.SIGTERM]),
        ("worker", [signal.SIGTERM]),
    ],
    ids=["run-sigint", "run-sigint-twice", "run-sigterm", "worker-sigterm"],  # worker: the same handler
)
def test_interrupt_mid_trial_then_resume(tmp_path: Path, command: str, signals: list[signal.Signals]) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = [*TINY, "study.name=cut", "study.n_trials=1", f"search.space={space}", f"study.storage={storage}"]
    args.append("quality.enabled=false")  # its reference server would only lengthen the test
    argv = [sys.executable, "-m", "autotune.cli", command, *args]
    log = tmp_path / "runs/cut/trials/0000/server.log"
    code, output, survivors = signal_when_ready(argv, tmp_path, log, signals)
    assert code == 130, output
    assert not survivors, f"processes outlived the run: {survivors}"
    assert "interrupted; run the same command again to resume" in output, output

    first = optuna.load_study(study_name="cut", storage=storage).trials[0]
    assert first.state.name == "FAIL" and first.user_attrs[R.REASON] == "interrupted"
    assert first.user_attrs[R.RETRYABLE] is True
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("autotune-cut")
    assert experiment is not None
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`autotune.role` = 'study'")
    assert parent.info.status == "KILLED"

    resumed = subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout.decode(errors="replace")
    trials = optuna.load_study(study_name="cut", storage=storage).trials
    measured = [t for t in trials if t.user_attrs.get(R.MEASURED) and not t.user_attrs.get(R.RETRYABLE)]
    assert len(measured) == 1 and measured[0].state.name == "COMPLETE"
    assert measured[0].user_attrs[R.CONFIG_KEY] == first.user_attrs[R.CONFIG_KEY]
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`autotune.role` = 'study'")
    assert parent.info.status == "FINISHED"
