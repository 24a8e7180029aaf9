"""The watch around a benchmark, against real servers: a killed server fails it at once, a stopped or hung
one within trial.stall_timeout_s, a slow but streaming one not at all; nothing is left running.

The scripted server (tests/fake_server.py) keeps these to seconds; the last two tests run whole trials on
the builtin engine (ServerProcess, llama-tiny), whose start-up alone takes 10-20 s here."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from autotune.config.settings import TrialSettings
from autotune.traffic.config import ArrivalConfig, ClientConfig, LengthDistribution, WorkloadConfig
from autotune.traffic.runner import BenchmarkResult, run_benchmark_async
from autotune.trial.runner import Traffic, TrialOutcome, run_trial
from autotune.trial.watch import Progress, ServerDied, ServerHung, WatchCancelled, watched
from serving.config import DeploymentConfig
from tests.fake_server import fake_server_process

SLACK_S = 1.0
"""Detection may lag the event by the poll interval (0.2 s) plus cancelling the benchmark on 2 busy cores."""


def _workload(tokens: int) -> WorkloadConfig:
    return WorkloadConfig(
        prefix_len=4, input_len=LengthDistribution(mean=12), output_len=LengthDistribution(mean=tokens)
    )


def _benchmark(
    url: str, arrival: ArrivalConfig, progress: Progress, tokens: int = 40, processes: int = 1
) -> Coroutine[Any, Any, BenchmarkResult]:
    return run_benchmark_async(
        url,
        "fake",
        _workload(tokens),
        arrival,
        client=ClientConfig(processes=processes),
        progress=False,
        on_chunk=progress.tick,
    )


async def _watch_with(
    url: str,
    proc: subprocess.Popen[str],
    arrival: ArrivalConfig,
    stall_timeout_s: float,
    fault: Callable[[], None] | None = None,
    *,
    at_s: float = 1.0,
    processes: int = 1,
    tokens: int = 40,
) -> tuple[BenchmarkResult | BaseException, float]:
    """Run a watched benchmark, `fault()` at `at_s`; (result or the exception, seconds from fault to end)."""
    progress = Progress()
    started, faulted = time.monotonic(), []

    def inject(fault: Callable[[], None]) -> None:
        faulted.append(time.monotonic())
        fault()

    timer = asyncio.get_running_loop().call_later(at_s, inject, fault) if fault is not None else None
    try:
        outcome: BenchmarkResult | BaseException = await watched(
            _benchmark(url, arrival, progress, tokens, processes), proc, stall_timeout_s, progress
        )
    except (ServerDied, ServerHung) as err:
        outcome = err
    ended = time.monotonic()
    if timer is not None:
        timer.cancel()
        assert faulted, f"the watched benchmark ended before the fault: {outcome!r}"
    return outcome, ended - (faulted[0] if faulted else started)


def _gone(pid: int) -> bool:
    """The process and its whole group are gone (a reaped pid, no member of group pid left)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return False


def _our_client_workers() -> list[psutil.Process]:
    me = psutil.Process()
    return [p for p in me.children(recursive=True) if "autotune.traffic.worker" in " ".join(p.cmdline())]


# 40 tokens at 25 ms: each request streams for ~1 s; 5 req/s for 50 requests keeps the benchmark busy ~11 s
BUSY = ArrivalConfig(kind="constant", rate=5, num_requests=50)


async def test_a_killed_server_fails_the_benchmark_at_once() -> None:
    with fake_server_process(5, 25) as (url, proc):
        outcome, after_s = await _watch_with(
            url, proc, BUSY, 30.0, lambda: os.killpg(proc.pid, signal.SIGKILL)
        )
    assert isinstance(outcome, ServerDied), outcome
    assert "code -9: SIGKILL" in str(outcome) and "during the benchmark" in str(outcome)
    assert after_s < SLACK_S  # unwatched, the remaining 45 requests would fail one by one for ~9 s
    assert _gone(proc.pid)


async def test_a_stopped_server_fails_as_hung_within_the_stall_timeout() -> None:
    with fake_server_process(5, 25) as (url, proc):
        outcome, after_s = await _watch_with(
            url, proc, BUSY, 1.5, lambda: os.killpg(proc.pid, signal.SIGSTOP)
        )
        assert proc.poll() is None  # alive (stopped) until the fixture ends its group
    assert isinstance(outcome, ServerHung), outcome
    assert "no token" in str(outcome) and "its process is stopped" in str(outcome)
    assert 1.5 - 0.025 <= after_s < 1.5 + SLACK_S  # the last token may precede the stop by 25 ms
    assert _gone(proc.pid)


async def test_a_server_that_accepts_but_never_streams_fails_as_hung() -> None:
    with fake_server_process(5, 25, "hang") as (url, proc):
        outcome, after_s = await _watch_with(url, proc, BUSY, 1.0)
    assert isinstance(outcome, ServerHung), outcome
    assert "trial.stall_timeout_s=1" in str(outcome) and "stopped" not in str(outcome)
    assert 1.0 <= after_s < 1.0 + SLACK_S


async def test_a_slow_server_that_streams_is_not_hung() -> None:
    """Each request streams for 2.5 s, 2.5 stall timeouts, with a token every 250 ms: it is slow, not hung
    (this fails if the client's on_chunk ticks do not reach the watch)."""
    with fake_server_process(5, 250) as (url, proc):
        arrival = ArrivalConfig(kind="closed", concurrency=1, num_requests=1)
        outcome, _ = await _watch_with(url, proc, arrival, 1.0, tokens=10)
    assert isinstance(outcome, BenchmarkResult), outcome
    assert outcome.summary["completed"] == 1 and outcome.summary["mean_e2el_ms"] > 2000


async def test_several_client_processes_report_tokens_and_are_stopped_with_the_benchmark() -> None:
    """Client workers relay tokens: 4.5 s of 4.8 s streams outlive the 3 s stall timeout. Then the server is
    stopped: the benchmark fails as hung and the workers are killed, not left waiting on it."""
    with fake_server_process(5, 300) as (url, proc):
        arrival = ArrivalConfig(kind="closed", concurrency=2, num_requests=20)
        stop = lambda: os.killpg(proc.pid, signal.SIGSTOP)  # noqa: E731
        hung, after_s = await _watch_with(url, proc, arrival, 3.0, stop, at_s=4.5, processes=2, tokens=16)
        assert isinstance(hung, ServerHung), hung
        # after the fault (the tokens kept it alive till then), within the stall timeout of the last token,
        # which may precede the fault by one token interval (300 ms)
        assert 3.0 - 0.3 <= after_s < 3.0 + SLACK_S
        assert not _our_client_workers()


async def test_an_error_caused_by_the_death_is_reported_as_the_death() -> None:
    with fake_server_process() as (_, proc):

        async def fails_once_the_server_is_gone() -> None:
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            raise ConnectionError("connection refused")  # e.g. from /tokenize, before any token

        with pytest.raises(ServerDied, match="code -9") as caught:
            await watched(fails_once_the_server_is_gone(), proc, 30.0, Progress())
    assert isinstance(caught.value.__cause__, ConnectionError)

    with fake_server_process() as (_, proc):

        async def fails_while_it_runs() -> None:
            raise ConnectionError("the awaitable's own error")

        with pytest.raises(ConnectionError):
            await watched(fails_while_it_runs(), proc, 30.0, Progress())


async def test_time_this_process_spent_blocked_is_not_blamed_on_the_server() -> None:
    async def blocks_then_returns() -> int:
        time.sleep(2.5)  # e.g. building prompts: the event loop (and the watch) cannot run
        return 7

    with fake_server_process() as (_, proc):
        assert await watched(blocks_then_returns(), proc, 1.0, Progress()) == 7


async def test_cancel_stops_the_benchmark() -> None:
    cancel = threading.Event()
    asyncio.get_running_loop().call_later(0.5, cancel.set)
    progress = Progress()
    with fake_server_process(5, 25) as (url, proc):
        started = time.monotonic()
        with pytest.raises(WatchCancelled):
            await watched(_benchmark(url, BUSY, progress), proc, 30.0, progress, cancel)
    assert time.monotonic() - started < 0.5 + SLACK_S


def _trial_with_fault(
    tmp_path: Path, sig: signal.Signals, settings: TrialSettings
) -> tuple[TrialOutcome, dict[str, float], int]:
    """run_trial on llama-tiny, `sig` to its server's group once the timed requests stream.

    Returns the outcome, when each phase began and the signal was sent (monotonic), and the server's pid.
    """
    trial_dir = tmp_path / "trial"
    times: dict[str, float] = {}
    pid: list[int] = []

    def fault() -> None:
        while not pid:  # the server: our child started with this trial's deploy file
            pid[:] = [p.pid for p in psutil.Process().children() if str(trial_dir) in " ".join(p.cmdline())]
            time.sleep(0.05)
        port = psutil.Process(pid[0]).cmdline()[-1]
        deadline = time.monotonic() + 120
        while _generated_tokens(f"http://127.0.0.1:{port}") < 4 * 32:  # warm-up done, the timed run streams
            if time.monotonic() > deadline:
                return  # the trial ended without streaming: the assertions say how
            time.sleep(0.1)
        os.killpg(pid[0], sig)
        times["signal"] = time.monotonic()

    def on_phase(phase: str) -> None:
        times[phase] = time.monotonic()
        if phase == "benchmarking":
            threading.Thread(target=fault, daemon=True).start()

    config = DeploymentConfig().replace(**{"model.path": "llama-tiny"})
    # 4 req/s for 200 requests: a 50 s benchmark unless the watch ends it
    traffic = Traffic(
        _workload(32), ArrivalConfig(kind="constant", rate=4, num_requests=200, warmup_requests=1)
    )
    outcome = run_trial(config, traffic, settings, trial_dir, on_phase=on_phase)
    times["returned"] = time.monotonic()
    return outcome, times, pid[0]


def _generated_tokens(url: str) -> float:
    """The builtin server's serving_generation_tokens_total (0 until it answers)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    lines = [line for line in text.splitlines() if line.startswith("serving_generation_tokens_total")]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.mark.slow
def test_a_trial_whose_server_is_killed_fails_within_two_seconds(tmp_path: Path) -> None:
    outcome, times, pid = _trial_with_fault(tmp_path, signal.SIGKILL, TrialSettings(startup_timeout_s=120))
    assert not outcome.ok and outcome.reason is not None
    assert "server exited with code -9: SIGKILL" in outcome.reason, (outcome.reason, times)
    assert times["stopping server"] - times["signal"] < SLACK_S, times
    assert times["returned"] - times["signal"] < 2.0, times
    assert _gone(pid)


@pytest.mark.slow
def test_a_trial_whose_server_is_stopped_fails_as_hung_and_leaves_nothing(tmp_path: Path) -> None:
    # 4 s: the builtin engine on 2 cores shared with other jobs can pause its stream for a second or two
    settings = TrialSettings(startup_timeout_s=120, stall_timeout_s=4.0)
    outcome, times, pid = _trial_with_fault(tmp_path, signal.SIGSTOP, settings)
    assert not outcome.ok and outcome.reason is not None
    assert "server hung" in outcome.reason and "its process is stopped" in outcome.reason, (
        outcome.reason,
        times,
    )
    # the stall clock starts at the last token, which may precede the stop by one token interval
    assert 4.0 - 0.5 <= times["stopping server"] - times["signal"] < 4.0 + SLACK_S, times
    # stopping a stopped group: SIGTERM with SIGCONT, so it need not wait trial.stop_timeout_s for SIGKILL
    assert times["returned"] - times["stopping server"] < settings.stop_timeout_s
    assert _gone(pid)
