"""One client process of a multi-process run: `python -m autotune.traffic.worker PLAN.pkl OUT.json`.

Protocol on stdin/stdout (plain subprocesses: no multiprocessing semaphores or tracker processes to leak):
the worker opens its HTTP pool, prints READY, reads the shared start instant (a perf_counter value; the
clock is CLOCK_MONOTONIC, common to all processes), prints T after each finished request and C when tokens
arrived (at most every CHUNK_REPORT_S), writes its records to OUT.json and prints DONE."""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
import time
from pathlib import Path

from autotune.traffic.records import RequestRecord
from autotune.traffic.schedule import ClientPlan, http_client_for, run_in_loop, run_plan

CHUNK_REPORT_S = 0.25
"""Token progress is reported at most this often: enough for a stall watch, cheap at any token rate."""


def _tick() -> None:
    sys.stdout.write("T\n")
    sys.stdout.flush()


class _ChunkReporter:
    """The on_chunk hook of a worker: a C line when tokens arrived, at most every CHUNK_REPORT_S."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last >= CHUNK_REPORT_S:
            self._last = now
            sys.stdout.write("C\n")
            sys.stdout.flush()


async def _run(plan: ClientPlan) -> tuple[list[RequestRecord], float, float]:
    async with http_client_for(plan) as http:
        print("READY", flush=True)
        origin = float(await asyncio.to_thread(sys.stdin.readline))
        return await run_plan(plan, http, origin, _tick, _ChunkReporter())


def main(argv: list[str]) -> int:
    plan_path, out_path = Path(argv[0]), Path(argv[1])
    plan: ClientPlan = pickle.loads(plan_path.read_bytes())
    records, _, end = run_in_loop(_run(plan), plan.client.uvloop)
    out_path.write_text(json.dumps({"records": [r.as_json() for r in records], "end": end}))
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
