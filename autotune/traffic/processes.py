"""Several client processes on one schedule, for loads one process cannot send on time.

Request i goes to process i % N. Workers are plain subprocesses (autotune.traffic.worker) talking over
stdin/stdout, so no multiprocessing semaphores or tracker processes outlive a run; they start on one shared
perf_counter instant (CLOCK_MONOTONIC is common to all processes on Linux), so their records merge exactly.
A worker reports tokens at most every worker.CHUNK_REPORT_S (a line per token would cost more than the
request), so an on_chunk hook here hears of progress in that resolution."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from autotune.traffic.client import OnChunk
from autotune.traffic.records import RequestRecord
from autotune.traffic.schedule import ClientPlan, Tick

_START_MARGIN_S = 0.05
_STOP_POLL_S = 0.1


def _split(plan: ClientPlan, parts: int) -> list[ClientPlan]:
    def share(total: int | None, p: int) -> int | None:
        return None if total is None else max(1, total // parts + (1 if p < total % parts else 0))

    return [
        dataclasses.replace(
            plan, items=plan.items[p::parts], concurrency=share(plan.concurrency, p), process=p
        )
        for p in range(parts)
    ]


class ProcessesStopped(RuntimeError):
    """`stop` was set: the workers were killed before they finished."""


def run_processes(
    plan: ClientPlan,
    parts: int,
    tick: Tick,
    on_chunk: OnChunk = None,
    stop: threading.Event | None = None,
) -> tuple[list[RequestRecord], float, float]:
    """`parts` worker processes (autotune.traffic.worker) on one schedule -> (records, origin, end).

    Setting `stop` (from another thread: this one blocks) kills the workers and raises ProcessesStopped.
    """
    with tempfile.TemporaryDirectory(prefix="autotune-bench-") as tmp:
        procs, outs = [], []
        for part in _split(plan, parts):
            plan_path, out_path = Path(tmp) / f"plan{part.process}.pkl", Path(tmp) / f"out{part.process}.json"
            plan_path.write_bytes(pickle.dumps(part))
            command = [sys.executable, "-m", "autotune.traffic.worker", str(plan_path), str(out_path)]
            procs.append(
                subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
                )
            )
            outs.append(out_path)
        readers: list[threading.Thread] = []
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdin is not None  # both are PIPEs
                while not select.select([proc.stdout], [], [], _STOP_POLL_S)[0]:  # start-up takes seconds
                    if stop is not None and stop.is_set():
                        raise ProcessesStopped("stopped while the client workers started")
                line = proc.stdout.readline().strip()
                if line != "READY":
                    raise RuntimeError(
                        f"client worker {proc.pid} did not start (exit {proc.wait()}): {line!r}"
                    )
            origin = time.perf_counter() + _START_MARGIN_S
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(f"{origin!r}\n")
                proc.stdin.flush()
            readers = [threading.Thread(target=_follow, args=(proc, tick, on_chunk)) for proc in procs]
            for reader in readers:
                reader.start()
            while alive := [reader for reader in readers if reader.is_alive()]:
                if stop is not None and stop.is_set():
                    raise ProcessesStopped("stopped before the client workers finished")
                alive[0].join(_STOP_POLL_S)
            codes = [proc.wait() for proc in procs]
            if any(codes):
                raise RuntimeError(f"client worker(s) failed with exit codes {codes}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            for reader in readers:  # their pipes are closed now
                reader.join()
        results = [json.loads(out.read_text()) for out in outs]
    records = sorted(
        (RequestRecord.from_json(r) for result in results for r in result["records"]), key=lambda r: r.index
    )
    return records, origin, max(result["end"] for result in results)


async def run_processes_async(
    plan: ClientPlan, parts: int, tick: Tick, on_chunk: OnChunk = None
) -> tuple[list[RequestRecord], float, float]:
    """run_processes in a thread; cancelled, it kills the workers and waits for them before it goes on, so
    a benchmark stopped by a watch leaves no client process behind."""
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(run_processes, plan, parts, tick, on_chunk, stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({work})
        if not work.cancelled():
            work.exception()  # ProcessesStopped, expected: retrieved so asyncio does not log it
        raise


def _follow(proc: subprocess.Popen[str], tick: Tick, on_chunk: OnChunk) -> None:
    """Relay a worker's per-request ticks (T) and token reports (C) until it says DONE (or exits)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("T"):
            tick()
        elif line.startswith("C"):
            if on_chunk is not None:
                on_chunk()
        elif line.startswith("DONE"):
            return
