"""Decode attention over the paged KV cache: today's block gather + SDPA against flex_attention reading the
cache in place, timed interleaved in one process (A, B, B, A, ...), so load from other work hits both alike.

    nice -n 19 .venv/bin/python -m bench.paged_attention [--batch 1 8 32] [--context 128 512 1024]
        [--dtype float32 bfloat16] [--block-size 16] [--rounds 15] [--inner 20] [--threads 0]

A: serving.engine.attention.decode_attention, the engine's decode path (index_select of each row's whole
   blocks, then one SDPA with the query heads of a KV head stacked as its queries).
B: torch.nn.attention.flex_attention compiled by inductor (its C++ CPU template), reading the cache
   [1, KVH, slots, D] in place through a BlockMask whose kv indices are the block table (torch's
   experimental PagedAttention does the same): full blocks unmasked, each row's last partial block masked
   by offset. The BlockMask is built once per step and shared by the layers: its cost is its own column.
Shapes are the model's (config.json: heads, KV heads, head dim, layers); every row's context is drawn in
[context/2, context] (row 0 exactly context) over randomly placed blocks. Each figure is the median
(min-max) over rounds of the mean of `inner` calls; the ratio is taken per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from bench.machine import machine
from serving.engine.attention import decode_attention

MODELS = Path(__file__).resolve().parents[1] / "serving" / "models"


@dataclass(frozen=True)
class Shapes:
    heads: int
    kv_heads: int
    head_dim: int
    layers: int


def model_shapes(name: str) -> Shapes:
    config = json.loads((MODELS / name / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return Shapes(heads, config["num_key_value_heads"], head_dim, config["num_hidden_layers"])


def block_mask(blocks: torch.Tensor, contexts: torch.Tensor, block_size: int, num_blocks: int) -> BlockMask:
    """The block table as flex_attention's sparse blocks over the physical cache (one query row each).

    Full blocks need no mask; the one partial block of a row is masked by its offset. The kernel asserts
    that the index tensors span the whole cache, hence num_blocks columns.
    """
    batch, width = blocks.shape
    full = contexts // block_size
    remainder = contexts % block_size
    full_indices = blocks.new_zeros(batch, 1, 1, num_blocks, dtype=torch.int32)
    full_indices[:, 0, 0, :width] = blocks
    partial_indices = blocks.new_zeros(batch, 1, 1, num_blocks, dtype=torch.int32)
    partial_indices[:, 0, 0, 0] = blocks.gather(1, full.clamp(max=width - 1)[:, None])[:, 0]

    def last_block(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return kv % block_size < remainder[b]

    return BlockMask.from_kv_blocks(
        (remainder > 0).to(torch.int32).view(batch, 1, 1),
        partial_indices,
        full.to(torch.int32).view(batch, 1, 1),
        full_indices,
        BLOCK_SIZE=(1, block_size),
        mask_mod=last_block,
        seq_lengths=(1, num_blocks * block_size),
        compute_q_blocks=False,
    )


def _timed(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1000


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def compare(
    shapes: Shapes, batch: int, context: int, dtype: torch.dtype, block_size: int, args: argparse.Namespace
) -> str:
    gen = torch.Generator().manual_seed(batch * 10_000 + context)
    slots = args.num_blocks * block_size
    k_cache = torch.randn(slots, shapes.kv_heads, shapes.head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(slots, shapes.kv_heads, shapes.head_dim, generator=gen).to(dtype)
    contexts = torch.randint(context // 2, context + 1, (batch,), generator=gen)
    contexts[0] = context
    width = -(-context // block_size)
    blocks = torch.stack([torch.randperm(args.num_blocks, generator=gen)[:width] for _ in range(batch)])
    span = width * block_size
    mask = (torch.arange(span)[None, :] < contexts[:, None]).view(batch, 1, 1, span)
    q = torch.randn(batch, shapes.heads, shapes.head_dim, generator=gen).to(dtype)
    scale = shapes.head_dim**-0.5
    k_view = k_cache.view(1, slots, shapes.kv_heads, shapes.head_dim).transpose(1, 2)
    v_view = v_cache.view(1, slots, shapes.kv_heads, shapes.head_dim).transpose(1, 2)
    flex = args.flex

    def gather() -> torch.Tensor:
        return decode_attention(q, k_cache, v_cache, blocks, mask, block_size, scale)

    def in_place(bm: BlockMask) -> torch.Tensor:
        out = flex(q.unsqueeze(2), k_view, v_view, block_mask=bm, scale=scale, enable_gqa=True)
        return out.view(batch, shapes.heads, shapes.head_dim)

    with torch.inference_mode():
        bm = block_mask(blocks, contexts, block_size, args.num_blocks)
        started = time.perf_counter()
        error = (gather().float() - in_place(bm).float()).abs().max().item()
        first = time.perf_counter() - started
        a, b, build, ratio = [], [], [], []
        for r in range(args.rounds):
            if r % 2 == 0:  # alternate which goes first
                ta, tb = _timed(gather, args.inner), _timed(lambda: in_place(bm), args.inner)
            else:
                tb, ta = _timed(lambda: in_place(bm), args.inner), _timed(gather, args.inner)
            tm = _timed(lambda: block_mask(blocks, contexts, block_size, args.num_blocks), args.inner)
            a.append(ta)
            b.append(tb)
            build.append(tm)
            ratio.append((shapes.layers * tb + tm) / (shapes.layers * ta))
    return (
        f"| {batch} | {context} | {str(dtype)[6:]} | {_summary(a)} | {_summary(b)} | {_summary(build)} "
        f"| {_summary(ratio)} | {error:.1e} | {first:.1f} |"
    )


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="llama-57m")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--context", nargs="+", type=int, default=[128, 512, 1024])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--block-size", type=int, default=16, help="cache.block_size (the engine's default)")
    parser.add_argument("--num-blocks", type=int, default=1024, help="blocks in the cache (~0.25 GB fp32)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core we may use)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    args.flex = torch.compile(flex_attention, dynamic=False)
    shapes = model_shapes(args.model)
    print(f"machine: {machine()}  threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"model: {args.model} {shapes}  block_size: {args.block_size}  load: {os.getloadavg()}")
    print(
        "| batch | context | dtype | gather+SDPA ms/layer | flex ms/layer | BlockMask ms/step "
        "| flex/gather per step | max abs diff | first call s |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtype:
        for batch in args.batch:
            for context in args.context:
                row = compare(shapes, batch, context, getattr(torch, dtype), args.block_size, args)
                print(row, flush=True)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
