"""Decode-step time of each dtype / quantisation option on a shipped model, as a table.

Why: the tuner searches precision.dtype x precision.quantization; this shows what each option costs or
saves on the machine at hand before a study spends trials on it. The model is loaded exactly as the
engine loads it (serving.engine.model_loader.load_model, dummy weights), a prompt of --context tokens is
prefilled into a transformers DynamicCache at batch 1 and repeated to each batch size, then --steps
single-token decode steps are timed (median or min, after --warmup untimed steps). Options refused for this
device are listed with the ConfigError's reason.

Usage: python bench/quantization.py [--model llama-57m] [--batch 1 8 32] [--context 160] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.config import ConfigError, DeploymentConfig
from serving.engine.model_loader import load_model, resolve_device
from serving.engine.quantization import check_precision_supported

OPTIONS: list[tuple[str, str]] = [
    ("float32", "none"),
    ("bfloat16", "none"),
    ("float16", "none"),
    ("float32", "int8_dynamic"),
    ("float32", "int8_weight_only"),
    ("bfloat16", "int8_weight_only"),
    ("bfloat16", "int4_weight_only"),
    ("float32", "bnb_int8"),
    ("float32", "bnb_nf4"),
]
"""(precision.dtype, precision.quantization) pairs, float32/none first as the baseline."""


@dataclass(frozen=True)
class Row:
    dtype: str
    quantization: str
    weights_mb: float | None
    ms_per_step: dict[int, float]
    note: str = ""


def serialized_mb(model: torch.nn.Module) -> float:
    """Size of the state dict as torch.save writes it: counts packed/quantised weights honestly."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6


@torch.inference_mode()
def decode_ms(model: torch.nn.Module, batch: int, context: int, steps: int, warmup: int, stat: str) -> float:
    """Median (or min) ms of one decode step for `batch` sequences with `context` tokens already cached."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 31000, (1, context), generator=generator).to(device)
    cache = DynamicCache()
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(batch)
    tokens = torch.randint(0, 31000, (batch, 1), generator=generator).to(device)
    times: list[float] = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        model(input_ids=tokens, past_key_values=cache, use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return min(times) if stat == "min" else statistics.median(times)


def measure(args: argparse.Namespace, dtype: str, quantization: str) -> Row:
    config = DeploymentConfig().replace(
        **{
            "model.path": args.model,
            "device": args.device,
            "precision.dtype": dtype,
            "precision.quantization": quantization,
        }
    )
    try:
        check_precision_supported(config)
    except ConfigError as err:
        return Row(dtype, quantization, None, {}, f"refused: {err}")
    model = load_model(config, "sdpa", resolve_device(config.device))
    ms = {b: decode_ms(model, b, args.context, args.steps, args.warmup, args.stat) for b in args.batch}
    return Row(dtype, quantization, serialized_mb(model), ms)


def print_table(rows: list[Row], batches: list[int]) -> None:
    """ms per decode step and the speed-up over the first measured row (float32/none by default)."""
    base = next((row.ms_per_step for row in rows if row.ms_per_step), {})
    header = f"{'dtype':<9} {'quantization':<17} {'weights MB':>10}"
    header += "".join(f" {f'b={b} ms':>9} {'speed':>6}" for b in batches)
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row.dtype:<9} {row.quantization:<17} "
        if not row.ms_per_step:
            print(line + row.note)
            continue
        line += f"{row.weights_mb:>10.1f}"
        for b in batches:
            ms = row.ms_per_step[b]
            line += f" {ms:>9.1f} {base[b] / ms:>5.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-57m")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=160, help="tokens already in the cache")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--stat", choices=["median", "min"], default="median", help="min is steadier on a shared machine"
    )
    parser.add_argument("--only", nargs="+", metavar="DTYPE/QUANT", help="subset, e.g. float32/int8_dynamic")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = OPTIONS
    if args.only:
        options = [tuple(o.split("/", 1)) for o in args.only]  # type: ignore[misc]
    print(
        f"{args.model}, decode step with {args.context} cached tokens, {args.stat} of {args.steps}; "
        f"torch {torch.__version__}, {args.threads} threads, {platform.machine()}"
    )
    rows = []
    for dtype, quantization in options:
        rows.append(measure(args, dtype, quantization))
        print(f"  measured {dtype}/{quantization}", file=sys.stderr, flush=True)
    print_table(rows, args.batch)


if __name__ == "__main__":
    main()
