"""What this machine runs: a space's `machine: true` dimensions keep only those choices, so one space file
serves a 2-core laptop and an 8-GPU node alike (derived from the devices, never a file per machine).

| key                     | kept when                                                                 |
|-------------------------|---------------------------------------------------------------------------|
| parallel.dp / tp / pp   | the degree is within the devices (GPUs, else CPU cores); products are    |
|                         | checked per sample by the pre-launch check                                |
| precision.dtype         | float32 anywhere; bfloat16 on GPUs and on CPUs with AVX-512 BF16 or AMX;  |
|                         | float16 on GPUs and on CPUs with AVX-512 FP16 or AMX-FP16                  |
| precision.quantization  | the paths maintained for the device (QUANTIZATION below)                  |

Without those ISA extensions a CPU converts 16-bit floats in software: bfloat16 served slower than float32
on an AVX2 machine and faster on an AVX-512 BF16 EPYC (485 against 379 output tok/s, 32 users), so which
dtypes are searched is the CPU's call, not the space author's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from autotune.space.dimension import Dimension
from autotune.space.search_space import SearchSpace
from autotune.trial.devices import Devices
from serving.config import ConfigError

MACHINE_KEYS = (
    "parallel.dp",
    "parallel.tp",
    "parallel.pp",
    "precision.dtype",
    "precision.quantization",
)
"""The keys a dimension may narrow to the machine with `machine: true`."""

DTYPE_CPU_FLAGS: dict[str, tuple[str, ...]] = {
    "float32": (),
    "bfloat16": ("avx512_bf16", "amx_bf16"),
    "float16": ("avx512_fp16", "amx_fp16"),
}
"""CPU flags (any one) that give a 16-bit dtype native kernels; float32 needs none."""

QUANTIZATION: dict[str, tuple[str, ...]] = {
    "cpu": ("none", "int8_dynamic", "int8_weight_only"),
    "cuda": ("none", "int8_weight_only", "int4_weight_only", "bnb_int8", "bnb_nf4"),
}
"""Quantisation paths with a maintained kernel per device: fbgemm int8 and torchao int8 on the CPU
(torchao int4 has no CPU kernel here, bitsandbytes' CPU path is a fallback nobody deploys); torchao and
bitsandbytes on CUDA (fbgemm's dynamic int8 is CPU-only)."""


def why_not_here(key: str, value: Any, devices: Devices) -> str | None:
    """Why `key=value` cannot run on these devices (None: it can)."""
    if key.startswith("parallel."):
        if value <= devices.count:
            return None
        unit = "GPU(s)" if devices.gpus else "CPU core(s)"
        return f"{key}={value} needs {value} {unit}, this machine has {devices.count}"
    if key == "precision.dtype":
        flags = DTYPE_CPU_FLAGS[value]
        if devices.gpus or not flags or devices.cpu_flags & set(flags):
            return None
        return f"precision.dtype={value} has no native kernel on this CPU (no {' / '.join(flags)}) or a GPU"
    if key == "precision.quantization":
        if value in QUANTIZATION[devices.kind]:
            return None
        return f"precision.quantization={value} has no maintained {devices.kind} path"
    raise ConfigError(f"{key}: not a key narrowed to the machine; use one of {', '.join(MACHINE_KEYS)}")


def narrow_to_machine(space: SearchSpace, devices: Devices) -> SearchSpace:
    """The space with every `machine: true` dimension's choices cut to what runs here; seeds that name a
    cut value are left out. Each cut is recorded in `narrowed` (autotune plan prints them)."""
    notes: list[str] = []
    cut: dict[str, set[str]] = {}
    dims: list[Dimension] = []
    for dim in space.dimensions:
        if not dim.machine:
            dims.append(dim)
            continue
        kept: list[Any] = []
        dropped: list[str] = []
        for value in dim.choices:
            reason = why_not_here(dim.name, value, devices)
            if reason:
                dropped.append(reason)
            else:
                kept.append(value)
        if not kept:
            raise ConfigError(
                f"{space.path}: dimensions.{dim.name}: no choice runs here ({'; '.join(dropped)})"
            )
        notes += dropped
        cut[dim.name] = {repr(v) for v in dim.choices if v not in kept}
        dims.append(dataclasses.replace(dim, choices=tuple(kept)))
    seeds = []
    for index, seed in enumerate(space.seeds):
        if _uses_cut(seed, cut):
            notes.append(f"seeds[{index}] left out: {dict(seed)} names a value that does not run here")
        else:
            seeds.append(seed)
    return dataclasses.replace(space, dimensions=tuple(dims), seeds=tuple(seeds), narrowed=tuple(notes))


def _uses_cut(seed: Mapping[str, Any], cut: Mapping[str, set[str]]) -> bool:
    return any(repr(value) in cut.get(key, set()) for key, value in seed.items())
