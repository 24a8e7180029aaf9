"""vLLM's own benchmark client (`vllm bench serve`, from the vLLM venv) against any OpenAI-compatible URL.

Shared by the bench scripts that put our client beside vLLM's: the interpreter is the vllm backend's
(SERVING_VLLM_PYTHON, else the project's .venv-vllm), the load is vLLM's random dataset (input_len ids
as the server counts them, exactly output_len generated tokens with ignore_eos), closed at `concurrency`
(--request-rate inf --max-concurrency N) or Poisson at `rate`.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from serving.backends.vllm import VLLMBackend

ENTRY = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)


def vllm_python() -> Path:
    return VLLMBackend().python


def run_vllm_client(
    url: str,
    model: str,
    tokenizer: Path,
    out_dir: Path,
    *,
    input_len: int,
    output_len: int,
    num_prompts: int,
    warmups: int,
    concurrency: int | None = None,
    rate: float | None = None,
) -> dict[str, float]:
    """One `vllm bench serve` run; every number of its saved result (output_throughput, p99_ttft_ms, ...)."""
    if (concurrency is None) == (rate is None):
        raise ValueError(f"give exactly one of concurrency={concurrency} and rate={rate}")
    load = (
        ["--request-rate", "inf", "--max-concurrency", str(concurrency)]
        if concurrency is not None
        else ["--request-rate", str(rate), "--burstiness", "1.0"]
    )
    name = f"vllm-{time.monotonic_ns()}.json"
    command = [
        str(vllm_python()), "-c", ENTRY,
        "--backend", "openai",
        "--base-url", url,
        "--endpoint", "/v1/completions",
        "--model", model,
        "--tokenizer", str(tokenizer),
        "--dataset-name", "random",
        "--random-input-len", str(input_len),
        "--random-output-len", str(output_len),
        "--random-range-ratio", "0",
        "--num-prompts", str(num_prompts),
        "--ignore-eos",
        "--temperature", "0",
        "--num-warmups", str(warmups),
        "--seed", "0",
        "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,95,99",
        "--save-result",
        "--result-dir", str(out_dir),
        "--result-filename", name,
        *load,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(
            f"vLLM's client failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
    data = json.loads((out_dir / name).read_text())
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
