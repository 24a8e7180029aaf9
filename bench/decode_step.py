"""Milliseconds per engine decode step at batch 1/8/32 with ~160 tokens of context, per attention backend.

    .venv/bin/python -m bench.decode_step [--attention eager sdpa paged] [--batch 1 8 32]
        [--quantization none int8_dynamic] [--model llama-57m] [--steps 30] [--context 160]
        [--layout engine row-major] [--forward lean transformers] [--dtype float32 bfloat16]
        [--compile eager compiled]

--layout row-major undoes the engine's column-major float32 Linear weights (serving/engine/weight_layout.py)
so both layouts can be compared side by side in one run. --forward transformers loads transformers' forward
in place of the engine's own (serving/engine/llama.py), for before/after in one run.

A step is the whole engine step (schedule, metadata, forward, sampling, postprocess), not the forward alone.
Target (issue 2): <= 8 ms at batch 1 for llama-57m (bandwidth floor 5.5 ms). Timings on a shared machine are
noisy; the median wall time of --steps steps is printed with its 10th-90th percentile range, and the median
CPU time of this process per step (steadier when other processes compete for the cores).
--floor prints the batch-1 memory-bandwidth floor beside: bytes of the matrices a decode step reads over
the best copy bandwidth of a 256 MB buffer measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch

from serving.config import DeploymentConfig
from serving.engine.attention import attn_implementation_name
from serving.engine.llm_engine import LLMEngine, eos_token_ids, set_torch_threads
from serving.engine.model_loader import load_model, resolve_device
from serving.engine.sampling_params import SamplingParams


def measure(engine: LLMEngine, batch: int, context: int, steps: int) -> tuple[list[float], list[float]]:
    """Prefill `batch` prompts of `context` tokens, then time `steps` decode steps of the whole batch.

    Returns (wall ms, CPU ms of this process) per step: on a shared machine CPU time is the steadier figure.
    """
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
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        engine.step()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    for i in range(batch):
        engine.abort(f"b{batch}-{i}")
    return wall, cpu


def row_major_linear_weights(model: torch.nn.Module) -> None:
    """nn.Linear's own layout (contiguous [out, in]), to compare against the engine's column-major one."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.weight = torch.nn.Parameter(module.weight.detach().contiguous(), requires_grad=False)


def build(config: DeploymentConfig, lean: bool) -> LLMEngine:
    """LLMEngine.from_config, with the forward chosen (from_config always takes the lean one it can)."""
    set_torch_threads()
    device = resolve_device(config.device)
    model = load_model(config, attn_implementation_name(config.attention), device, lean=lean)
    return LLMEngine(config, model, eos_token_ids=eos_token_ids(model, None))


def copy_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
    """GB/s of the best of `repeats` copies of a buffer far larger than the caches (read + write bytes)."""
    src = torch.empty(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a batch-1 decode step must read: every matrix but the embedding (one row of it is read)."""
    embedding = model.get_input_embeddings().weight  # type: ignore[operator]
    return sum(
        p.numel() * p.element_size() for p in model.parameters() if p.dim() >= 2 and p is not embedding
    )


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="llama-57m")
    parser.add_argument("--attention", nargs="+", default=["eager", "sdpa", "paged"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--quantization", nargs="+", default=["none"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--context", type=int, default=160)
    parser.add_argument("--layout", nargs="+", default=["engine"], choices=["engine", "row-major"])
    parser.add_argument("--forward", nargs="+", default=["lean"], choices=["lean", "transformers"])
    parser.add_argument("--compile", nargs="+", default=["eager"], choices=["eager", "compiled"])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument(
        "--floor", action="store_true", help="also print the batch-1 floor: weight bytes / copy bandwidth"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core we may use)")
    args = parser.parse_args()
    print(f"model: {args.model}  context: {args.context}")
    print(
        f"{'mode':<9}{'dtype':<10}{'forward':<13}{'quantization':<14}"
        f"{'attention':<10}{'layout':<11}{'batch':>6}{'wall ms':>9}{'p10':>8}{'p90':>8}"
        f"{'cpu ms':>8}"
    )
    combos = itertools.product(
        args.compile, args.dtype, args.forward, args.quantization, args.attention, args.layout
    )
    for mode, dtype, forward, quant, attention, layout in combos:
        if mode == "compiled" and forward != "lean":
            continue
        flat = {
            "precision.dtype": dtype,
            "model.path": args.model,
            "attention": attention,
            "precision.quantization": quant,
            "cache.kv_cache_memory_gb": 0.25,
            "device": "cpu",
        }
        engine = build(DeploymentConfig.from_flat(flat), lean=forward == "lean")
        if mode == "compiled":
            started = time.perf_counter()
            engine.runner.model.compile((2,))  # type: ignore[operator]
            print(f"compiled in {time.perf_counter() - started:.1f} s", flush=True)
        if layout == "row-major":
            row_major_linear_weights(engine.runner.model)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.floor:
            size, bandwidth = weight_bytes(engine.runner.model), copy_bandwidth()
            floor = size / bandwidth / 1e6
            print(f"floor: {size / 1e6:.1f} MB / {bandwidth:.1f} GB/s = {floor:.2f} ms", flush=True)
        for batch in args.batch:
            wall, cpu = measure(engine, batch, args.context, args.steps)
            wall.sort()
            p10, p90 = wall[len(wall) // 10], wall[(len(wall) * 9) // 10]
            median, median_cpu = statistics.median(wall), statistics.median(cpu)
            row = f"{mode:<9}{dtype:<10}{forward:<13}{quant:<14}{attention:<10}{layout:<11}{batch:>6}"
            row += f"{median:>9.2f}{p10:>8.2f}{p90:>8.2f}"
            print(f"{row}{median_cpu:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
