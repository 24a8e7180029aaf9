"""The model's Linear layers in int8, eager and compiled: torch.ao quantize_dynamic (the int8_dynamic path)
against torchao's Int8DynamicActivationInt8WeightConfig and Int8WeightOnlyConfig, float32 beside them,
timed interleaved in one process (every variant once per round, the order rotating).

    nice -n 19 .venv/bin/python -m bench.int8_linears [--batch 1 8 32] [--rounds 12] [--inner 10]
        [--variants ...] [--threads 0]

One call runs every Linear a decode step runs (config.json's shapes: fused qkv and gate/up, o, down per
layer, then the lm_head) on [batch, in_features] inputs: the GEMM part of a step without attention.
compiled = torch.compile (inductor) with freezing, as the engine's compiled mode does, one graph per batch
size. Printed: median (min-max) ms per call over rounds, and each variant's ratio to int8_dynamic eager
(the engine's path today) taken per round. A variant that fails to build or compile prints its error.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.machine import machine

MODELS = Path(__file__).resolve().parents[1] / "serving" / "models"
BASELINE = "int8_dynamic eager"


class ModelLinears(nn.Module):
    """Every Linear of one decode step, in model order, each applied to an input of its width."""

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in shapes)

    def forward(self, inputs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [linear(inputs[linear.in_features]) for linear in self.linears]


def step_shapes(model: str) -> list[tuple[int, int]]:
    """(in, out) of the Linears a decode step of the lean forward runs."""
    config = json.loads((MODELS / model / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    layer = [
        (hidden, (heads + 2 * kv_heads) * head_dim),
        (heads * head_dim, hidden),
        (hidden, 2 * inter),
        (inter, hidden),
    ]
    return layer * config["num_hidden_layers"] + [(hidden, config["vocab_size"])]


def _quantized(base: nn.Module, kind: str) -> nn.Module:
    model = copy.deepcopy(base)
    if kind == "float32":
        return model
    if kind == "int8_dynamic":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = (
        Int8DynamicActivationInt8WeightConfig() if kind == "torchao_int8_dynamic" else Int8WeightOnlyConfig()
    )
    quantize_(model, config)
    return model


def variants(base: nn.Module, names: list[str]) -> dict[str, Callable[..., object]]:
    """name -> callable(inputs); compiled ones with inductor freezing, as serving/engine/compiled.py does."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    built: dict[str, Callable[..., object]] = {}
    for name in names:
        kind, mode = name.split()
        model = _quantized(base, kind)
        if mode == "compiled":
            model.forward = _own_forward(model, kind)  # type: ignore[method-assign]
        built[name] = model if mode == "eager" else torch.compile(model, backend="inductor")
    return built


def _own_forward(model: nn.Module, tag: str) -> Callable[..., object]:
    """model.forward on a code object of its own. Dynamo caches graphs per code object, and once the
    torch.ao-quantised copy had compiled ModelLinears.forward, torchao's copies failed to compile the same
    code ("Argument 'weight_tensor' ... used before it has been defined")."""
    code = ModelLinears.forward.__code__.replace(co_name=f"forward_{tag}")
    function = types.FunctionType(code, ModelLinears.forward.__globals__, code.co_name)
    return types.MethodType(function, model)


def _timed(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1000


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def compare(fns: dict[str, Callable[..., object]], batch: int, args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(batch)
    widths = sorted({i for i, _ in step_shapes(args.model)})
    inputs = {w: torch.randn(batch, w, generator=gen) for w in widths}
    live: dict[str, Callable[..., object]] = {}
    for name, fn in fns.items():
        started = time.perf_counter()
        try:
            fn(inputs)
        except Exception as error:  # a variant that cannot run here is a result, not a crash
            print(f"| {batch} | {name} | fails: {type(error).__name__}: {str(error)[:120]} | | |", flush=True)
            continue
        live[name] = fn
        if time.perf_counter() - started > 1:
            print(f"  ({name}: first call {time.perf_counter() - started:.1f} s)", flush=True)
    times: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(lambda fn=live[name]: fn(inputs), args.inner))  # type: ignore[misc]
    for name in names:
        ratio = ""
        if BASELINE in times:
            ratio = _summary([t / b for t, b in zip(times[name], times[BASELINE], strict=True)])
        print(f"| {batch} | {name} | {_summary(times[name])} | {ratio} |", flush=True)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="llama-57m")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--inner", type=int, default=10)
    kinds = ["float32", "int8_dynamic", "torchao_int8_dynamic", "torchao_int8_weight_only"]
    parser.add_argument(
        "--variants", nargs="+", default=[f"{k} {m}" for k in kinds for m in ("eager", "compiled")]
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core we may use)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    print(f"machine: {machine()}  threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"model: {args.model}, {len(step_shapes(args.model))} Linears per step  load: {os.getloadavg()}")
    base = ModelLinears(step_shapes(args.model)).eval().requires_grad_(False)
    print(f"| batch | variant | ms per step's Linears | / {BASELINE} |")
    print("|---:|---|---:|---:|")
    with torch.no_grad():  # quantised under inference_mode, torchao's weights fail to compile
        fns = variants(base, args.variants)
    with torch.inference_mode():
        for batch in args.batch:
            compare(fns, batch, args)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
