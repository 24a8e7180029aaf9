"""Transient infrastructure failures are retried once; configuration failures are not. Real builtin servers
on llama-tiny, driven by the real study loop: a slow start (not healthy within trial.startup_timeout_s),
ports taken by someone else on every attempt, and a model path that does not exist."""

from __future__ import annotations

import contextlib
import resource
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from optuna.trial import FrozenTrial, TrialState

import serving.launch
from autotune.report import results as R
from autotune.study.loop import StudyLoop
from autotune.study.storage import open_study
from tests.autotune.test_study import ONE_CONFIG, context

SERVER_ADDRESS_SPACE = 8 * 2**30
"""Virtual memory a llama-tiny server may map under the cap (it maps about 1.2 GiB)."""
QUICK = ["quality.enabled=false", "+trial.stop_timeout_s=3", "arrival.num_requests=4", "arrival.rate=20"]


def live_children() -> set[int]:
    """Pids of this test process's live descendants (servers are started as our children)."""
    alive = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.add(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


@contextlib.contextmanager
def address_space_capped(limit: int) -> Iterator[None]:
    """Every process this test starts meanwhile gets RLIMIT_AS = limit as soon as it is seen (within
    10 ms, long before a server allocates its KV cache): an oversized allocation then fails at once
    whatever the kernel's overcommit policy, instead of pressing on a machine others share."""
    stop = threading.Event()
    seen: set[int] = set()

    def cap() -> None:
        while not stop.wait(0.01):
            for pid in live_children() - seen:
                seen.add(pid)
                with contextlib.suppress(OSError):
                    resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))

    watcher = threading.Thread(target=cap, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def run_study(tmp_path: Path, space: dict, *overrides: str) -> list[FrozenTrial]:
    """StudyLoop.run() for study.n_trials=1; its trials. Asserts it left no process of its own behind."""
    before = live_children()
    ctx = context(tmp_path, space, *QUICK, "study.n_trials=1", *overrides)
    study = open_study(ctx)
    StudyLoop(ctx, study).run()
    assert live_children() <= before, f"processes outlived the study: {live_children() - before}"
    return study.trials


def test_a_slow_start_is_retried_once_then_stands(tmp_path: Path) -> None:
    # importing torch alone takes longer than 1 s: every launch is a real slow start
    first, retry, *more = run_study(tmp_path, ONE_CONFIG, "trial.startup_timeout_s=1")
    assert not more, [t.user_attrs.get(R.REASON) for t in more]
    assert first.state == retry.state == TrialState.FAIL
    assert first.params == retry.params
    assert first.user_attrs[R.CONFIG_KEY] == retry.user_attrs[R.CONFIG_KEY]
    for trial in (first, retry):
        reason = trial.user_attrs[R.REASON]
        assert "not healthy" in reason and "within 1 s (trial.startup_timeout_s" in reason, reason
        assert trial.user_attrs[R.TRANSIENT] is True
        assert Path(trial.user_attrs[R.TRIAL_DIR], "server.log").is_file()
    assert first.user_attrs[R.RETRYABLE] is True and "launched once more" in first.user_attrs[R.REASON]
    assert R.RETRYABLE not in retry.user_attrs
    assert f"transient again after trial {first.number}'s: not retried" in retry.user_attrs[R.REASON]


@pytest.fixture
def taken_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """serving.launch.free_port answers a port another socket listens on, as long as the list holds
    budget; then the kernel's free port. Yields [remaining handouts of the taken port]."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    budget = [0]
    real = serving.launch.free_port

    def fake() -> int:
        if budget[0] > 0:
            budget[0] -= 1
            return int(taken)
        return real()

    monkeypatch.setattr(serving.launch, "free_port", fake)
    yield budget
    holder.close()


def test_ports_taken_on_every_attempt_fail_transiently_and_the_retry_measures(
    tmp_path: Path, taken_port: list[int]
) -> None:
    # the first trial's three launches all find the port taken; the retry's first too, its second not
    taken_port[0] = serving.launch.PORT_RETRIES + 1
    first, retry, *more = run_study(tmp_path, ONE_CONFIG, "trial.startup_timeout_s=120")
    assert not more and taken_port[0] == 0
    assert first.state == TrialState.FAIL and first.user_attrs[R.RETRYABLE] is True
    reason = first.user_attrs[R.REASON]
    assert f"port was taken on all {serving.launch.PORT_RETRIES} attempts" in reason, reason
    assert retry.state == TrialState.COMPLETE, retry.user_attrs.get(R.REASON)
    assert retry.params == first.params and retry.user_attrs[R.MEASURED] is True
    log = Path(retry.user_attrs[R.TRIAL_DIR], "server.log").read_text()
    assert log.lower().count("address already in use") == 1  # moved to a free port on its own


def test_out_of_memory_at_load_is_a_configuration_failure_and_not_retried(tmp_path: Path) -> None:
    # a KV cache of 4x this machine's memory: each of llama-tiny's 4 KV tensors (2 layers, K and V) is
    # larger than the machine and than the server's address-space cap, so the first allocation fails
    # before a page is touched
    budget = 4 * psutil.virtual_memory().total / 2**30
    space = {**ONE_CONFIG, "base": {**ONE_CONFIG["base"], "cache.kv_cache_memory_gb": round(budget)}}
    with address_space_capped(SERVER_ADDRESS_SPACE):
        (only, *more) = run_study(
            tmp_path, space, "trial.startup_timeout_s=120", f"planner.memory_limit_gb={4 * budget:.0f}"
        )
    assert not more, [t.user_attrs.get(R.REASON) for t in more]
    assert only.state == TrialState.FAIL and only.user_attrs[R.MEASURED] is True
    reason = only.user_attrs[R.REASON]
    assert "before it was healthy" in reason and "can't allocate memory" in reason, reason
    assert R.RETRYABLE not in only.user_attrs and R.TRANSIENT not in only.user_attrs
