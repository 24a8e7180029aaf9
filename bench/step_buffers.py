"""Whole engine decode steps with the runner's reused gather buffers (serving/engine/workspace.py) on and off,
alternated in one process on one engine, so load from other work hits both alike.

    nice -n 19 .venv/bin/python -m bench.step_buffers [--batch 8 32] [--context 160 512]
        [--dtype float32 bfloat16] [--compile eager compiled] [--rounds 10] [--inner 5] [--threads 0]

Per (mode, dtype, batch, context): prefill `batch` prompts of `context` tokens, then `rounds` rounds of
`inner` decode steps with the workspace and `inner` without (which goes first alternates). Printed: median
(min-max) of the per-round mean step ms, and the ratio on/off per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.decode_step import build
from bench.machine import machine
from serving.config import DeploymentConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.workspace import Workspace


def _steps(engine: LLMEngine, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        engine.step()
    return (time.perf_counter() - start) / count * 1000


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def compare(engine: LLMEngine, batch: int, context: int, rounds: int, inner: int) -> tuple[str, str, str]:
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=2 * rounds * inner + 8, temperature=0, ignore_eos=True)
    ids = [f"b{batch}-{context}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, torch.randint(0, 30000, (context,), generator=gen).tolist(), params)
    while engine.scheduler.waiting or any(s.num_computed_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    _steps(engine, 3)
    runner, workspace = engine.runner, Workspace()
    on: list[float] = []
    off: list[float] = []
    for r in range(rounds):
        for use in (True, False) if r % 2 == 0 else (False, True):
            runner.workspace = workspace if use else None  # type: ignore[assignment]
            (on if use else off).append(_steps(engine, inner))
    runner.workspace = workspace
    for request_id in ids:
        engine.abort(request_id)
    ratio = [a / b for a, b in zip(on, off, strict=True)]
    return _summary(on), _summary(off), _summary(ratio)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="llama-57m")
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--context", nargs="+", type=int, default=[160, 512])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--compile", nargs="+", default=["eager"], choices=["eager", "compiled"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the engine's own choice)")
    args = parser.parse_args()
    print(f"machine: {machine()}  torch {torch.__version__}  threads: {args.threads or 'engine'}")
    print(f"load: {os.getloadavg()}")
    print("| mode | dtype | batch | context | step ms, workspace | step ms, fresh tensors | on/off |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode in args.compile:
        for dtype in args.dtype:
            flat = {
                "precision.dtype": dtype,
                "model.path": args.model,
                "attention": "paged",
                "cache.kv_cache_memory_gb": 1.0,
                "device": "cpu",
            }
            engine = build(DeploymentConfig.from_flat(flat), lean=True)
            if args.threads:
                torch.set_num_threads(args.threads)
            if mode == "compiled":
                engine.runner.model.compile((2,))  # type: ignore[operator]
            for batch in args.batch:
                for context in args.context:
                    row = compare(engine, batch, context, args.rounds, args.inner)
                    print(f"| {mode} | {dtype} | {batch} | {context} | {' | '.join(row)} |", flush=True)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
