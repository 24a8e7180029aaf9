"""Quality next to speed for every precision / quantisation option on this machine (issue 14's table).

For each model (the grammar Llama trained on the spot: real numbers; llama-57m with dummy weights:
synthetic quality, real speed) every option is served by the builtin engine, one at a time, and
- probed by the quality guard against the float32 / no-quantisation reference (default probe: 8 prompts,
  16 continuation tokens, top-5 logprobs): token agreement, mean KL, perplexity ratio, and whether the
  default bounds pass;
- timed: `--repeats` rounds of `--concurrency` concurrent greedy completions of `--max-tokens` tokens
  (ignore_eos), output tokens per second per round; median and min-max reported.
Options this machine cannot run are listed with the reason the config check gives.

  python bench/quality.py [--out bench/results/quality.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autotune.quality.guard import QualityGuard  # noqa: E402
from autotune.quality.settings import QualitySettings  # noqa: E402
from autotune.traffic.config import WorkloadConfig  # noqa: E402
from serving.config import ConfigError, DeploymentConfig  # noqa: E402
from serving.engine.quantization import check_precision_supported  # noqa: E402
from serving.launch import ServerProcess  # noqa: E402
from tests.trained_model import train  # noqa: E402

OPTIONS = [
    ("float32", "none"),
    ("bfloat16", "none"),
    ("float16", "none"),
    ("float32", "int8_dynamic"),
    ("float32", "int8_weight_only"),
    ("bfloat16", "int4_weight_only"),
    ("float32", "bnb_int8"),
    ("float32", "bnb_nf4"),
]


def machine() -> dict[str, str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
    return {
        "model": fields.get("Model name", "?").strip(),
        "cpus": fields.get("CPU(s)", "?").strip(),
        "isa": " ".join(sorted(isa)),
    }


def tokens_per_s(url: str, model: str, concurrency: int, max_tokens: int) -> float:
    body = {
        "model": model,
        "prompt": "the cat sees",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }

    def one(_: int) -> int:
        reply = httpx.post(url + "/v1/completions", json=body, timeout=300)
        reply.raise_for_status()
        return int(reply.json()["usage"]["completion_tokens"])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(one, range(concurrency)))
    return total / (time.perf_counter() - started)


def measure(
    base: DeploymentConfig, guard: QualityGuard, args: argparse.Namespace, work: Path
) -> list[dict[str, Any]]:
    rows = []
    bounds = guard.settings.bounds(synthetic=False)
    for dtype, quant in OPTIONS:
        config = base.replace(**{"precision.dtype": dtype, "precision.quantization": quant, "server.port": 0})
        row: dict[str, Any] = {"dtype": dtype, "quantization": quant}
        try:
            check_precision_supported(config)
        except ConfigError as err:
            rows.append({**row, "refused": str(err)})
            continue
        server = ServerProcess(config, log_path=work / f"{dtype}-{quant}.log")
        try:
            server.start()
            server.wait_healthy(300)
            metrics = guard.probe(server.url, config.model.name, work / f"{dtype}-{quant}")
            tokens_per_s(server.url, config.model.name, args.concurrency, 8)  # warm-up
            speeds = [
                tokens_per_s(server.url, config.model.name, args.concurrency, args.max_tokens)
                for _ in range(args.repeats)
            ]
        except Exception as err:
            rows.append({**row, "failed": f"{type(err).__name__}: {err}"})
            continue
        finally:
            server.stop()
        passed = all(
            (metrics.get(m, float("nan")) >= b) if kind == "min" else (metrics.get(m, float("nan")) <= b)
            for m, kind, b in bounds
            if m in metrics
        )
        rows.append(
            {
                **row,
                **metrics,
                "passes_default_bounds": passed,
                "tok_s": speeds,
                "tok_s_median": statistics.median(speeds),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quality-bench-"))
    trained = train(work / "grammar-llama")
    models = {
        "grammar-llama (trained on the spot)": (
            DeploymentConfig().replace(**{"model.path": str(trained), "model.load_format": "auto"}),
            WorkloadConfig(tokenizer=str(trained)),
        ),
        "llama-57m (dummy weights: quality synthetic)": (
            DeploymentConfig(),
            WorkloadConfig(tokenizer="llama-57m"),
        ),
    }
    result: dict[str, Any] = {"machine": machine(), "settings": vars(QualitySettings()), "models": {}}
    for name, (base, workload) in models.items():
        base = base.replace(**{"model.max_model_len": 512, "cache.kv_cache_memory_gb": 0.1})
        guard = QualityGuard(QualitySettings(), base, workload, work / name.split()[0])
        guard.prepare()
        result["models"][name] = measure(base, guard, args, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
