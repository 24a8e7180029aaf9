"""The fault matrix inside one real study (`autotune run`, llama-tiny, a real MLflow store): a server killed
with SIGKILL mid-load, one stopped with SIGSTOP (hung), one out of memory under load, one out of memory at
load, then a healthy one. Each faulty trial ends FAIL within its bound, with the reason in Optuna and in
its MLflow run (tag and server.log artifact), the study goes on to the next and measures the last, and no
process it started survives (checked by pid).

Slow start and taken ports (transient, retried once) are in test_transient_retry.py."""

from __future__ import annotations

import datetime
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from autotune.commands import run as run_command
from autotune.report import results as R
from serving.backends.builtin import BuiltinBackend
from serving.config import DeploymentConfig
from tests.autotune.test_run_e2e import STILL_RUNNING, TINY, trial_runs
from tests.autotune.test_transient_retry import SERVER_ADDRESS_SPACE, address_space_capped, live_children
from tests.autotune.test_trial_watch import _generated_tokens

STALL_S = 4.0
"""trial.stall_timeout_s here: the builtin engine on 2 busy cores can pause its stream for a second or two."""
SLACK_S = 2.0
"""Detection lags a fault by the watch's poll (0.2 s), stopping the server and telling the study."""
HUNGRY_SEQS = 6
"""The trial with this scheduler.max_num_seqs runs tests/serving/hungry_server.py."""


def space(huge_kv_gb: int) -> dict:
    seqs = [4, 5, HUNGRY_SEQS, 7, 8]
    kv = [0.05, 0.05, 0.05, huge_kv_gb, 0.05]
    return {
        "base": {"scheduler.policy": "continuous"},
        "dimensions": {
            "scheduler.max_num_seqs": {"type": "categorical", "choices": seqs},
            "cache.kv_cache_memory_gb": {"type": "categorical", "choices": sorted(set(kv))},
        },
        "seeds": [
            {"scheduler.max_num_seqs": seqs[i], "cache.kv_cache_memory_gb": kv[i]} for i in range(len(seqs))
        ],
    }


class Injector:
    """Watches for this test's server processes and faults trial 0 with SIGKILL and trial 1 with SIGSTOP
    once their timed requests stream. Remembers every pid it saw, and when each signal was sent."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}
        """Every process of this test's tree seen while the study ran: pid -> its creation time."""
        self.sent: dict[int, datetime.datetime] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Injector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for pid in live_children() - set(self.seen):
                try:
                    self.seen[pid] = psutil.Process(pid).create_time()
                except psutil.Error:
                    continue
                trial = _trial_of(pid)
                if trial in (0, 1):
                    sig = signal.SIGKILL if trial == 0 else signal.SIGSTOP
                    threading.Thread(target=self._fault, args=(pid, trial, sig), daemon=True).start()

    def _fault(self, pid: int, trial: int, sig: signal.Signals) -> None:
        port = psutil.Process(pid).cmdline()[-1]
        deadline = time.monotonic() + 120
        while _generated_tokens(f"http://127.0.0.1:{port}") < 6 * 8:  # past the warm-up: timed load
            if time.monotonic() > deadline or self._stop.is_set():
                return  # the assertions say what happened instead
            time.sleep(0.1)
        os.killpg(pid, sig)
        self.sent[trial] = datetime.datetime.now()  # Optuna's clock: naive local time


def _alive(pid: int, created: float) -> bool:
    """The very process seen (not a later one given the same pid) still runs, wherever its parent is."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _trial_of(pid: int) -> int | None:
    try:
        found = re.search(r"trials/(\d{4})/server", " ".join(psutil.Process(pid).cmdline()))
    except psutil.Error:
        return None
    return int(found.group(1)) if found else None


@pytest.fixture
def hungry_trial(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The trial with scheduler.max_num_seqs=HUNGRY_SEQS is launched as tests.serving.hungry_server."""
    real = BuiltinBackend.command

    def command(self: BuiltinBackend, config: DeploymentConfig, port: int, **kw: object) -> list[str]:
        argv = real(self, config, port, **kw)  # type: ignore[arg-type]
        if config.scheduler.max_num_seqs == HUNGRY_SEQS:
            argv[argv.index("serving.cli")] = "tests.serving.hungry_server"
        return argv

    monkeypatch.setattr(BuiltinBackend, "command", command)
    yield


@pytest.mark.slow
def test_each_fault_fails_its_trial_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hungry_trial: None
) -> None:
    monkeypatch.chdir(tmp_path)
    huge = round(4 * psutil.virtual_memory().total / 2**30)  # each KV tensor larger than the machine
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space(huge)))
    before = live_children()
    with address_space_capped(SERVER_ADDRESS_SPACE), Injector() as injector:
        code = run_command.main(
            [
                "conf=chat",
                *TINY,
                *STILL_RUNNING,
                "study.name=faults",
                "study.n_trials=5",
                "search.space=space.yaml",
                "quality.enabled=false",
                f"trial.stall_timeout_s={STALL_S}",
                f"planner.memory_limit_gb={4 * huge}",
            ]
        )
    assert code == 0
    survivors = [pid for pid, created in injector.seen.items() if _alive(pid, created)]
    assert not survivors and live_children() <= before, f"processes outlived their trials: {survivors}"

    storage = f"sqlite:///{tmp_path / 'runs/faults/study.db'}"
    trials = optuna.load_study(study_name="faults", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL"] * 4 + ["COMPLETE"], [
        t.user_attrs.get(R.REASON) for t in trials
    ]
    reasons = [t.user_attrs.get(R.REASON, "") for t in trials]
    assert "server exited with code -9: SIGKILL" in reasons[0], reasons[0]
    assert "server hung" in reasons[1] and "its process is stopped" in reasons[1], reasons[1]
    assert "server exited with code 70" in reasons[2] and "can't allocate memory" in reasons[2], reasons[2]
    assert "before it was healthy" in reasons[3] and "can't allocate memory" in reasons[3], reasons[3]
    assert not any(t.user_attrs.get(R.RETRYABLE) for t in trials)  # none of these is transient
    killed, hung = (trials[n].datetime_complete - injector.sent[n] for n in (0, 1))
    durations = [round(t.user_attrs[R.DURATION], 1) for t in trials]
    print(f"\nfault matrix: SIGKILL -> FAIL in {killed.total_seconds():.2f} s, SIGSTOP -> FAIL in ", end="")
    print(f"{hung.total_seconds():.2f} s (stall {STALL_S:g} s); trial durations {durations} s")
    assert killed.total_seconds() < SLACK_S, (killed, reasons[0])
    assert STALL_S - 0.5 <= hung.total_seconds() < STALL_S + SLACK_S, (hung, reasons[1])

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("autotune-faults")
    assert experiment is not None
    runs = trial_runs(client, experiment.experiment_id)
    assert [r.info.status for r in runs] == ["FAILED"] * 4 + ["FINISHED"]
    logs = []
    for number, (run, reason) in enumerate(zip(runs[:4], reasons, strict=False)):
        assert run.data.tags["reason"] == reason[:5000]
        where = str(tmp_path / f"artifacts{number}")
        logs.append(Path(client.download_artifacts(run.info.run_id, "server.log", where)).read_text())
    assert all("ready: serving" in log for log in logs[:3])
    assert "engine step loop died" in logs[2] and "can't allocate memory" in logs[2]
    assert "can't allocate memory" in logs[3] and "ready: serving" not in logs[3]
