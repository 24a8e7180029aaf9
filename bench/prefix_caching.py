"""TTFT and capacity of the builtin engine with automatic prefix caching on and off, on chat traffic.

    .venv/bin/python bench/prefix_caching.py [--rounds 3] [--concurrency 1 8] [--system-prompt 32 480]
        [--output-len 64] [--out bench/results/prefix_caching.json]

Load: conf/workload/chat.yaml (a shared system prompt, a ~96-token user turn, ~64 output tokens), with the
system prompt at each --system-prompt length (32 is the shipped workload; 480 is a long one as GPU chats
send); --output-len replaces the workload's ~64 output tokens (TTFT needs few: shorter runs on a
busy machine). Each concurrency is a closed loop of max(16, 4c) timed requests after warm-ups, measured by our
traffic runner. Both settings run in every round, in alternating order, on servers pinned to cores 0-1
(the machine is shared: compare within a round, read the spread across rounds).
Reports mean / p99 TTFT and output tok/s (capacity at the closed loop's concurrency) per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from autotune.traffic.config import ArrivalConfig, ClientConfig, WorkloadConfig
from autotune.traffic.runner import run_benchmark
from serving.config import DeploymentConfig
from serving.launch import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import machine

ROOT = Path(__file__).resolve().parents[1]
CPUS = [0, 1]
KEYS = ("mean_ttft_ms", "p99_ttft_ms", "output_throughput", "mean_tpot_ms")


def chat_workload(system_prompt: int, output_len: int | None) -> WorkloadConfig:
    data: dict[str, Any] = yaml.safe_load((ROOT / "conf" / "workload" / "chat.yaml").read_text())
    data["prefix_len"] = system_prompt
    if output_len is not None:
        data["output_len"] = {"mean": output_len}
    data["tokenizer"] = str(ROOT / "serving" / "models" / "llama-57m")
    return WorkloadConfig.from_config(data)


def measure(url: str, workload: WorkloadConfig, concurrency: int) -> dict[str, float]:
    arrival = ArrivalConfig(
        kind="closed", concurrency=concurrency, num_requests=max(16, 4 * concurrency), warmup_requests=4
    )
    result = run_benchmark(url, None, workload, arrival, client=ClientConfig(), progress=False)
    return {k: float(result.summary[k]) for k in (*KEYS, "failed")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--system-prompt", nargs="+", type=int, default=[32, 480])
    parser.add_argument(
        "--output-len", type=int, default=None, help="output tokens (default: the workload's)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefix_caching.json")
    args = parser.parse_args()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"start {started}; {machine()}; load average {os.getloadavg()}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prefix-caching-") as tmp:
        for round_ in range(args.rounds):
            order = (True, False) if round_ % 2 == 0 else (False, True)
            for enabled in order:
                config = DeploymentConfig().replace(
                    **{"server.port": 0, "cache.enable_prefix_caching": enabled, "model.max_model_len": 1024}
                )
                log = Path(tmp) / f"server-{round_}-{enabled}.log"
                with ServerProcess(config, log_path=log, cpus=CPUS) as server:
                    server.wait_healthy(300)
                    for prompt in args.system_prompt:
                        for c in args.concurrency:
                            found = measure(server.url, chat_workload(prompt, args.output_len), c)
                            row = {"round": round_, "prefix_caching": enabled, "system_prompt": prompt,
                                   "concurrency": c, **found}  # fmt: skip
                            print(json.dumps(row), flush=True)
                            rows.append(row)
    summary = summarise(rows)
    print("\n| system prompt | c | prefix caching | " + " | ".join(KEYS) + " |")
    print("| ---: | ---: | --- |" + " ---: |" * len(KEYS))
    for line in summary:
        cells = " | ".join(line[k] for k in KEYS)
        print(f"| {line['system_prompt']} | {line['concurrency']} | {line['prefix_caching']} | {cells} |")
    payload = {"started": started, "machine": machine(), "rows": rows, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median (min-max) over rounds of every key, per (system prompt, concurrency, setting)."""
    groups: dict[tuple[int, int, bool], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["system_prompt"], r["concurrency"], r["prefix_caching"]), []).append(r)
    out = []
    for (prompt, c, enabled), runs in sorted(groups.items()):
        line: dict[str, Any] = {"system_prompt": prompt, "concurrency": c, "prefix_caching": enabled}
        for k in KEYS:
            values = [r[k] for r in runs]
            line[k] = f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
        out.append(line)
    return out


if __name__ == "__main__":
    main()
