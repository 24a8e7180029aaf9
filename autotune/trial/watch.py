"""Watch a benchmark while it runs: the server's death or silence fails the trial at once.

Without a watch, a benchmark against a dead server goes on sending requests that fail one by one, and one
against a hung server (SIGSTOP'd, deadlocked) waits for every request's client time-out; either showed only
when the benchmark ended, if at all. `watched` runs any awaitable (one benchmark, or a capacity search of
several) and, every POLL_S, polls the server's process and a token counter the client ticks (the
`on_chunk` hook of autotune.traffic); it cancels the awaitable and raises when the server has exited, when
no token has arrived for `stall_timeout_s`, or when the study is cancelled.

    progress = Progress()
    result = await watched(run_benchmark_async(..., on_chunk=progress.tick), server, 30.0, progress)

"No token" counts time with no token at all, requests in flight or not: an open-loop workload whose gaps
between arrivals come near stall_timeout_s (rates far below 1 / stall_timeout_s) must raise it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

import psutil

T = TypeVar("T")

POLL_S = 0.2
"""How often the server and the token counter are looked at: a death is seen within this."""
MAX_CREDIT_S = 1.0
"""Most silence one poll may add: when this process's own event loop was blocked (building prompts), the
time is not blamed on the server."""
CANCEL_GRACE_S = 5.0
"""Time the cancelled awaitable gets to close its connections before the failure is raised anyway."""


class Watchable(Protocol):
    """A server process: ServerProcess, or any subprocess.Popen."""

    @property
    def pid(self) -> int | None: ...

    def poll(self) -> int | None: ...


class Progress:
    """Tokens received so far; `tick` is the client's on_chunk hook (cheap, callable from any thread).

    The watch only asks whether the count changed, so an increment lost between threads does no harm.
    """

    def __init__(self) -> None:
        self.count = 0

    def tick(self) -> None:
        self.count += 1


class WatchError(RuntimeError):
    """The watch stopped the benchmark; the message is the trial's failure reason."""


class ServerDied(WatchError):
    """The server process exited while the benchmark ran."""


class ServerHung(WatchError):
    """The server is alive but sent no token for stall_timeout_s."""


class WatchCancelled(WatchError):
    """The study was cancelled while the benchmark ran."""


async def watched(
    awaitable: Awaitable[T],
    server: Watchable,
    stall_timeout_s: float,
    progress: Progress,
    cancel: threading.Event | None = None,
    *,
    poll_s: float = POLL_S,
) -> T:
    """The awaitable's result; a WatchError (after cancelling it) when the server dies, hangs or `cancel`
    is set. An exception of the awaitable propagates, unless the server has exited: then ServerDied, the
    cause (a dropped connection is the symptom, not the reason), with the exception chained."""
    task = asyncio.ensure_future(awaitable)
    seen, silent_s, last = progress.count, 0.0, time.monotonic()
    try:
        while True:
            await asyncio.wait({task}, timeout=poll_s)
            if task.done():
                return _outcome(task, server)
            now = time.monotonic()
            silent_s, last = silent_s + min(now - last, MAX_CREDIT_S), now
            if progress.count != seen:
                seen, silent_s = progress.count, 0.0
            failure = _failure(server, silent_s, stall_timeout_s, cancel)
            if failure is not None:
                await _cancel(task)
                raise failure
    finally:
        if not task.done():  # the caller cancelled us: take the benchmark down too
            await _cancel(task)


def _outcome(task: asyncio.Future[T], server: Watchable) -> T:
    error = None if task.cancelled() else task.exception()
    code = server.poll() if error is not None else None
    if code is not None:
        raise _died(code) from error
    return task.result()


def _died(code: int) -> ServerDied:
    return ServerDied(f"server exited with code {code}{signal_hint(code)} during the benchmark")


def _failure(
    server: Watchable, silent_s: float, stall_timeout_s: float, cancel: threading.Event | None
) -> WatchError | None:
    if cancel is not None and cancel.is_set():
        return WatchCancelled("benchmark cancelled")
    code = server.poll()
    if code is not None:
        return _died(code)
    if silent_s >= stall_timeout_s:
        return ServerHung(
            f"server hung: no token for {silent_s:.1f} s while the benchmark ran "
            f"(trial.stall_timeout_s={stall_timeout_s:g}){_stopped_note(server.pid)}"
        )
    return None


async def _cancel(task: asyncio.Future[T]) -> None:
    task.cancel()
    await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


def signal_hint(code: int) -> str:
    """What an exit code says about how the process ended (negative: killed by that signal)."""
    if code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return ": SIGKILL, likely the out-of-memory killer"
    if code < 0 and -code in signal.Signals._value2member_map_:
        return f": {signal.Signals(-code).name}"
    return ""


def _stopped_note(pid: int | None) -> str:
    """Why a live server sends nothing, when the kernel knows: it is stopped (SIGSTOP, a debugger)."""
    if pid is None:
        return ""
    with contextlib.suppress(psutil.Error):
        if psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            return "; its process is stopped (SIGSTOP or a debugger)"
    return ""
