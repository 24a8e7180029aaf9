"""Parallel layouts of the builtin engine under a chat-like closed loop: dp1 vs dp2 vs tp2 vs pp2.

Why: the tuner sweeps the parallel layout first; this shows on the machine at hand what each layout
gives (output tok/s, p99 TTFT, TPOT) and what it costs (all-reduce time per step for TP, the bubble as
each stage's busy fraction for PP). Each layout is a real server (serving.launch.ServerProcess), driven by
the traffic runner (autotune.traffic.runner.run_benchmark): prompt 128 tokens (32 shared + 96), output 64,
ignore_eos, greedy, closed loop at each concurrency. Server-side numbers are read from /metrics before and
after each run (counter differences).

Usage: python bench/parallel.py [--model llama-57m] [--layouts dp1 dp2 tp2 pp2] [--concurrency 1 8 32]
                                [--requests 8 32 64] [--out reports/parallel.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.traffic.config import ArrivalConfig, LengthDistribution, WorkloadConfig
from autotune.traffic.runner import run_benchmark
from serving.config import DeploymentConfig
from serving.launch import ServerProcess

LAYOUTS: dict[str, dict[str, Any]] = {
    "dp1": {},
    "dp2": {"parallel.dp": 2},
    "tp2": {"parallel.tp": 2},
    "pp2": {"parallel.pp": 2},
    "dp2tp2": {"parallel.dp": 2, "parallel.tp": 2, "parallel.oversubscribe": True},
}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    """Sum over matching samples of after - before."""
    total = 0.0
    for key, value in after.items():
        sample_name, sample_labels = key
        if sample_name == name and all((k, v) in sample_labels for k, v in labels.items()):
            total += value - before.get(key, 0.0)
    return total


def server_side(before: dict[Any, float], after: dict[Any, float], wall_s: float) -> dict[str, float]:
    out: dict[str, float] = {}
    steps = delta(before, after, "serving_tp_steps_total")
    if steps:
        out["allreduce_ms_per_step"] = (
            1000 * delta(before, after, "serving_tp_allreduce_seconds_total") / steps
        )
        out["broadcast_ms_per_step"] = (
            1000 * delta(before, after, "serving_tp_step_broadcast_seconds_total") / steps
        )
    busy_name = "serving_pipeline_stage_busy_seconds_total"
    stages = sorted({dict(k[1]).get("stage", "") for k in after if k[0] == busy_name})
    for stage in stages:
        busy = delta(before, after, busy_name, stage=stage)
        out[f"stage{stage}_busy"] = busy / wall_s if wall_s > 0 else 0.0
    return out


def run_layout(name: str, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    overrides = {
        "model.path": args.model,
        "model.max_model_len": 512,
        "scheduler.max_num_seqs": max(args.concurrency),
        "scheduler.max_num_batched_tokens": 2048,
        "cache.kv_cache_memory_gb": 0.25,
        "server.port": 0,
        **LAYOUTS[name],
    }
    config = DeploymentConfig().replace(**overrides)
    workload = WorkloadConfig(
        name="chat",
        prefix_len=32,
        input_len=LengthDistribution(mean=96),
        output_len=LengthDistribution(mean=64),
        ignore_eos=True,
        temperature=0.0,
        tokenizer=args.model,
    )
    rows = []
    with ServerProcess(config, log_path=log_dir / f"{name}.log") as server:
        server.wait_healthy(300)
        for concurrency, num_requests in zip(args.concurrency, args.requests, strict=True):
            arrival = ArrivalConfig(
                kind="closed", concurrency=concurrency, num_requests=num_requests, warmup_requests=concurrency
            )
            before, start = scrape(server.url), time.perf_counter()
            result = run_benchmark(server.url, None, workload, arrival, progress=False)
            wall = time.perf_counter() - start
            after = scrape(server.url)
            s = result.summary
            row = {
                "layout": name,
                "concurrency": concurrency,
                "completed": s["completed"],
                "failed": s["failed"],
                "output_tok_s": s["output_throughput"],
                "p99_ttft_ms": s["p99_ttft_ms"],
                "median_tpot_ms": s["median_tpot_ms"],
                **server_side(before, after, wall),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = "| layout | conc | out tok/s | p99 TTFT ms | TPOT ms | all-reduce ms/step | stage busy |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        ar = f"{r['allreduce_ms_per_step']:.2f}" if "allreduce_ms_per_step" in r else "-"
        busy = " / ".join(f"{r[k]:.2f}" for k in sorted(r) if k.startswith("stage")) or "-"
        lines.append(
            f"| {r['layout']} | {r['concurrency']} | {r['output_tok_s']:.1f} | {r['p99_ttft_ms']:.0f} | "
            f"{r['median_tpot_ms']:.1f} | {ar} | {busy} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-57m")
    parser.add_argument("--layouts", nargs="+", default=["dp1", "dp2", "tp2", "pp2"], choices=list(LAYOUTS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", nargs="+", type=int, default=[8, 32, 64])
    parser.add_argument("--out", type=Path, default=Path("reports/bench/parallel.json"))
    args = parser.parse_args()
    if len(args.requests) != len(args.concurrency):
        parser.error("--requests needs one count per --concurrency value")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.layouts:
        rows += run_layout(name, args, args.out.parent / "parallel-logs")
    args.out.write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
