"""One client process of a multi-process run: `python -m autotune.traffic.worker PLAN.pkl OUT.json`.

Protocol on stdin/stdout (plain subprocesses: no multiprocessing semaphores or tracker processes to leak):
the worker opens its HTTP pool, prints READY, reads the shared start instant (a perf_counter value; the
clock is CLOCK_MONOTONIC, common to all processes), prints T after each finished request, writes its
records to OUT.json and prints DONE."""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
from pathlib import Path

from autotune.traffic.records import RequestRecord
from autotune.traffic.schedule import ClientPlan, http_client_for, run_in_loop, run_plan


def _tick() -> None:
    sys.stdout.write("T\n")
    sys.stdout.flush()


async def _run(plan: ClientPlan) -> tuple[list[RequestRecord], float, float]:
    async with http_client_for(plan) as http:
        print("READY", flush=True)
        origin = float(await asyncio.to_thread(sys.stdin.readline))
        return await run_plan(plan, http, origin, _tick)


def main(argv: list[str]) -> int:
    plan_path, out_path = Path(argv[0]), Path(argv[1])
    plan: ClientPlan = pickle.loads(plan_path.read_bytes())
    records, _, end = run_in_loop(_run(plan), plan.client.uvloop)
    out_path.write_text(json.dumps({"records": [r.as_json() for r in records], "end": end}))
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
