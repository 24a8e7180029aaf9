"""How fast the trial watch sees a fault and what it costs, against the scripted server (tests/fake_server.py)

1. Detection: a watched open-loop benchmark; 1 s in, the server's group gets SIGKILL (time until ServerDied)
   or SIGSTOP (time until ServerHung, minus trial.stall_timeout_s). Repeated; median and range.
2. Cost of the token hook: the same open-loop run with on_chunk=None and with the watch's Progress.tick,
   interleaved (A B A B ...), comparing the client's CPU seconds and p99 schedule lag.

    .venv/bin/python bench/watch.py [--repeats 5] [--out bench/results/watch.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

from autotune.traffic.config import ArrivalConfig, LengthDistribution, WorkloadConfig
from autotune.traffic.runner import run_benchmark_async
from autotune.trial.watch import Progress, ServerDied, ServerHung, watched

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/fake_server.py
from tests.fake_server import fake_server_process

STALL_S = 1.0
WORKLOAD = WorkloadConfig(
    prefix_len=8,
    input_len=LengthDistribution(mean=24),
    output_len=LengthDistribution(mean=32),
    align_with_server=False,
)


async def detection_s(sig: signal.Signals) -> float:
    """Seconds from the signal to the watch's failure (for SIGSTOP: beyond the stall timeout)."""
    with fake_server_process(5, 20) as (url, proc):
        progress = Progress()
        sent: list[float] = []

        def fault() -> None:
            os.killpg(proc.pid, sig)
            sent.append(time.monotonic())

        asyncio.get_running_loop().call_later(1.0, fault)
        arrival = ArrivalConfig(kind="constant", rate=20, num_requests=200)
        coroutine = run_benchmark_async(
            url, "fake", WORKLOAD, arrival, progress=False, on_chunk=progress.tick
        )
        try:
            await watched(coroutine, proc, STALL_S, progress)
            raise RuntimeError(f"{sig.name}: the benchmark finished; the watch saw nothing")
        except (ServerDied, ServerHung) as err:
            expected = ServerDied if sig == signal.SIGKILL else ServerHung
            if not isinstance(err, expected):
                raise RuntimeError(f"{sig.name}: {err!r}, expected {expected.__name__}") from err
        elapsed = time.monotonic() - sent[0]
    return elapsed - (STALL_S if sig == signal.SIGSTOP else 0.0)


async def hook_cost(url: str, hooked: bool, rate: float, seconds: float) -> dict[str, float]:
    progress = Progress()
    arrival = ArrivalConfig(kind="poisson", rate=rate, num_requests=int(rate * seconds), warmup_requests=20)
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = await run_benchmark_async(
        url, "fake", WORKLOAD, arrival, progress=False, on_chunk=progress.tick if hooked else None
    )
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    s = result.summary
    return {
        "client_cpu_s": cpu,
        "p99_schedule_lag_ms": float(s["p99_schedule_lag_ms"]),
        "achieved_req_s": float(s["request_throughput"]),
        "failed": float(s["failed"]),
        "ticks": float(progress.count),
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma") if f in flags]
    return {
        "cpu": fields.get("Model name", "").strip(),
        "cpus": os.cpu_count(),
        "isa": isa,
        "python": platform.python_version(),
        "load_avg_1_5_15": os.getloadavg(),
    }


async def run(repeats: int, rate: float, seconds: float) -> dict[str, Any]:
    kill = [await detection_s(signal.SIGKILL) for _ in range(repeats)]
    stop = [await detection_s(signal.SIGSTOP) for _ in range(repeats)]
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with fake_server_process(0, 0) as (url, _):
        for _ in range(repeats):
            for name in ("off", "on"):
                runs[name].append(await hook_cost(url, name == "on", rate, seconds))
    return {
        "machine": machine(),
        "detection": {
            "sigkill_to_failure_s": spread(kill),
            f"sigstop_to_failure_beyond_stall_timeout_{STALL_S:g}s": spread(stop),
        },
        "hook": {
            "rate_req_s": rate,
            "seconds": seconds,
            "tokens_per_request": WORKLOAD.output_len.mean,
            **{
                f"{name}_{key}": spread([r[key] for r in rs])
                for name, rs in runs.items()
                for key in ("client_cpu_s", "p99_schedule_lag_ms", "achieved_req_s")
            },
            "on_ticks_per_run": spread([r["ticks"] for r in runs["on"]]),
            "failed_requests": sum(r["failed"] for rs in runs.values() for r in rs),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop req/s of the hook-cost runs")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    report = asyncio.run(run(args.repeats, args.rate, args.seconds))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
