"""Milliseconds per engine decode step at batch 1/8/32 with ~160 tokens of context, per attention backend.

    .venv/bin/python -m bench.decode_step [--attention eager sdpa paged] [--batch 1 8 32]
        [--quantization none int8_dynamic] [--model llama-57m] [--steps 30] [--context 160]

A step is the whole engine step (schedule, metadata, forward, sampling, postprocess), not the forward alone.
Target (issue 2): <= 8 ms at batch 1 for llama-57m (bandwidth floor 5.5 ms). Timings on a shared machine are
noisy; the median of --steps steps is printed with the 10th-90th percentile range.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from serving.config import DeploymentConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampling_params import SamplingParams


def measure(engine: LLMEngine, batch: int, context: int, steps: int) -> list[float]:
    """Prefill `batch` prompts of `context` tokens, then time `steps` decode steps of the whole batch."""
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(
            f"b{batch}-{i}", torch.randint(0, 30000, (context,), generator=gen).tolist(), params
        )
    while engine.scheduler.waiting or any(s.num_computed_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):  # warm-up decodes
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1000)
    for i in range(batch):
        engine.abort(f"b{batch}-{i}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-57m")
    parser.add_argument("--attention", nargs="+", default=["eager", "sdpa", "paged"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--quantization", nargs="+", default=["none"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--context", type=int, default=160)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}  model: {args.model}  context: {args.context}")
    print(f"{'quantization':<14}{'attention':<10}{'batch':>6}{'median ms':>11}{'p10':>8}{'p90':>8}")
    for quant in args.quantization:
        for attention in args.attention:
            config = DeploymentConfig.from_flat(
                {
                    "model.path": args.model,
                    "attention": attention,
                    "precision.quantization": quant,
                    "cache.kv_cache_memory_gb": 0.25,
                    "device": "cpu",
                }
            )
            engine = LLMEngine.from_config(config)
            for batch in args.batch:
                times = sorted(measure(engine, batch, args.context, args.steps))
                p10, p90 = times[len(times) // 10], times[(len(times) * 9) // 10]
                print(
                    f"{quant:<14}{attention:<10}{batch:>6}{statistics.median(times):>11.2f}{p10:>8.2f}{p90:>8.2f}"
                )


if __name__ == "__main__":
    main()
