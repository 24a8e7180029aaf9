"""Our client beside vLLM's own benchmark client (vllm.benchmarks.serve from .venv-vllm, made by
scripts/setup_vllm.sh) on the same server and the same load, alternating runs so drift hits both sides.

    .venv/bin/python bench/client_vs_vllm.py [--server builtin|vllm|fake|http://host:port] [--rounds 2]
        [--num-prompts 64] [--concurrency 4] [--rate 4] [--input-len 128] [--output-len 64]

Loads: a closed loop at --concurrency (vLLM: --request-rate inf --max-concurrency N) and Poisson arrivals at
--rate. Prompts: --input-len tokens as the server counts them (vLLM's random dataset: input-len - BOS of
random ids + BOS) and exactly --output-len generated tokens (ignore_eos). --server fake is the scripted
server (TTFT 50 ms, ITL 20 ms): there any difference is the clients' own. Target (issue 3): TTFT, TPOT and
throughput within 5% of vLLM's. On a shared machine run-to-run noise can exceed that: compare the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from autotune.traffic.config import ArrivalConfig, LengthDistribution, WorkloadConfig
from autotune.traffic.runner import run_benchmark
from serving.config import DeploymentConfig
from serving.launch import ServerProcess, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/fake_server.py, bench/
from bench.vllm_client import run_vllm_client, vllm_python
from tests.fake_server import fake_server

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = vllm_python()
MODEL_DIR = ROOT / "serving" / "models" / "llama-57m"
KEYS = (
    "request_throughput",
    "output_throughput",
    "median_ttft_ms",
    "mean_ttft_ms",
    "median_tpot_ms",
    "mean_tpot_ms",
    "median_itl_ms",
    "median_e2el_ms",
)
FAKE_TTFT_MS, FAKE_ITL_MS = 50.0, 20.0


@contextmanager
def server(kind: str, log_dir: Path) -> Iterator[str]:
    """A server URL: an existing one, our builtin engine, or vLLM (CPU build) on llama-57m."""
    if kind.startswith("http"):
        yield kind.rstrip("/")
    elif kind == "fake":  # a scripted server: both clients should see its exact schedule
        with fake_server(FAKE_TTFT_MS, FAKE_ITL_MS) as url:
            yield url
    elif kind == "builtin":
        config = DeploymentConfig().replace(**{"server.port": 0})
        with ServerProcess(config, log_path=log_dir / "builtin.log") as ours_server:
            ours_server.wait_healthy(300)
            yield ours_server.url
    else:
        port = free_port()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
        command = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(MODEL_DIR),
            "--load-format",
            "dummy",
            "--dtype",
            "float32",
            "--port",
            str(port),
            "--enforce-eager",
            "--served-model-name",
            "llama-57m",
        ]
        with (log_dir / "vllm.log").open("w") as log:
            proc = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log_dir / 'vllm.log'}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def ours(url: str, model: str, args: argparse.Namespace, closed: bool) -> dict[str, float]:
    workload = WorkloadConfig(
        input_len=LengthDistribution(mean=args.input_len),
        output_len=LengthDistribution(mean=args.output_len),
        tokenizer=str(MODEL_DIR),
    )
    if closed:
        arrival = ArrivalConfig(
            kind="closed",
            concurrency=args.concurrency,
            num_requests=args.num_prompts,
            warmup_requests=args.warmups,
        )
    else:
        arrival = ArrivalConfig(
            kind="poisson", rate=args.rate, num_requests=args.num_prompts, warmup_requests=args.warmups
        )
    result = run_benchmark(url, model, workload, arrival, progress=False)
    return {k: float(result.summary[k]) for k in KEYS} | {"failed": float(result.summary["failed"])}


def vllm(url: str, model: str, args: argparse.Namespace, closed: bool, out_dir: Path) -> dict[str, float]:
    data = run_vllm_client(
        url,
        model,
        MODEL_DIR,
        out_dir,
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=args.num_prompts,
        warmups=args.warmups,
        concurrency=args.concurrency if closed else None,
        rate=None if closed else args.rate,
    )
    return {k: data[k] for k in KEYS} | {"failed": data["failed"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", default="builtin")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--warmups", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: run scripts/setup_vllm.sh first")
    with tempfile.TemporaryDirectory() as tmp, server(args.server, Path(tmp)) as url:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        print(f"server {args.server} at {url}, model {model}; load average {os.getloadavg()}", flush=True)
        for closed in (True, False):
            load = f"closed c={args.concurrency}" if closed else f"poisson r={args.rate}"
            runs: dict[str, list[dict[str, float]]] = {"ours": [], "vllm": []}
            for round_ in range(args.rounds):
                for side in ("ours", "vllm") if round_ % 2 == 0 else ("vllm", "ours"):
                    row = (
                        ours(url, model, args, closed)
                        if side == "ours"
                        else vllm(url, model, args, closed, Path(tmp))
                    )
                    runs[side].append(row)
                    print(json.dumps({"load": load, "round": round_, "client": side, **row}), flush=True)
            print(f"\n{load}: median over {args.rounds} rounds (ours / vLLM, difference)")
            for key in KEYS:
                a = statistics.median(r[key] for r in runs["ours"])
                b = statistics.median(r[key] for r in runs["vllm"])
                print(f"  {key:<20} {a:10.2f} {b:10.2f}  {100 * (a - b) / b if b else 0.0:+6.1f}%")
            print(flush=True)


if __name__ == "__main__":
    main()
