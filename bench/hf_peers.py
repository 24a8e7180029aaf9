"""transformers' own serving paths as peers of bench/serving_peers.py (its `generate` and `tf-serve` groups):
generate() offline on padded static batches, and `transformers serve` with and without continuous batching.
Kept apart so serving_peers.py holds the measurement and the comparison only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.serving_peers import (
    CPUS,
    INPUT_LEN,
    MODEL_DIR,
    OUTPUT_LEN,
    ROOT,
    Row,
    Run,
    measure,
    num_requests,
)
from serving.launch import free_port


def run_generate(concurrencies: list[int], quick: bool) -> list[Row]:
    """Offline padded static batches: c prompts of 128 tokens, 64 new tokens each, greedy, no EOS stop."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(len(CPUS))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR)).eval()
    vocab = model.config.vocab_size
    rows = []
    for c in concurrencies:
        ids = torch.randint(0, vocab, (c, INPUT_LEN))
        mask = torch.ones_like(ids)
        kwargs = {
            "attention_mask": mask,
            "max_new_tokens": OUTPUT_LEN,
            "min_new_tokens": OUTPUT_LEN,
            "do_sample": False,
            "pad_token_id": 0,
        }
        with torch.inference_mode():
            warm = {**kwargs, "attention_mask": mask[:, :16], "max_new_tokens": 4, "min_new_tokens": 4}
            model.generate(ids[:, :16], **warm)
            batches = max(1, num_requests(c, quick) // c)
            start = time.perf_counter()
            tokens = 0
            for _ in range(batches):
                out = model.generate(ids, **kwargs)
                tokens += (out.shape[1] - INPUT_LEN) * c
            elapsed = time.perf_counter() - start
        row = Row("hf generate (offline)", c, tokens / elapsed)
        print(json.dumps(row.__dict__), flush=True)
        rows.append(row)
    return rows


@contextlib.contextmanager
def tf_serve(model_dir: Path, continuous: bool, log: Path) -> Iterator[str]:
    """`transformers serve <dir>` pinned to CPUS in its own process group; its URL once /health answers."""
    port = free_port()
    command = [
        "taskset",
        "-c",
        ",".join(map(str, CPUS)),
        str(ROOT / ".venv" / "bin" / "transformers"),
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--continuous-batching" if continuous else "--no-continuous-batching",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    with log.open("w") as handle:
        proc = subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve not healthy in 180 s; see {log}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_tf_serve(run: Run) -> list[Row]:
    try:
        import accelerate  # noqa: F401  (transformers serve always loads with a device_map)
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        print(f"skipping tf-serve: {err} (needs the transformers[serving] extra and accelerate)", flush=True)
        return []
    log_dir = run.log_dir
    model_dir = log_dir / "llama-57m-random"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR))
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(model_dir)
    rows: list[Row] = []
    for continuous in (True, False):
        system = "transformers serve" + (" --continuous-batching" if continuous else "")
        try:
            with tf_serve(model_dir, continuous, log_dir / f"tf-serve-{continuous}.log") as url:
                rows += measure(url, str(model_dir), system, run, ignore_eos=False)
        except (RuntimeError, httpx.HTTPError) as err:
            print(f"skipping {system}: {err}", flush=True)
    return rows
