"""What machine a study measured on: the answer depends on it, so the report and best.yaml name it.

The CPU model and the instruction sets the engines use (AVX2, AVX-512, BF16, VNNI, AMX) change between
machines of one cloud type; a figure from another machine is not comparable."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

from autotune.trial.devices import Devices

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_model_and_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
            if model and flags:
                break
    except OSError:
        pass
    return model, [f for f in ISA_FLAGS if f in flags]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(devices: Devices, backend: str) -> dict[str, str]:
    """CPU model and ISA, GPUs, and the versions of what serves (the engine's own for a backend venv)."""
    model, isa = cpu_model_and_isa()
    return {
        "cpu": f"{model}, {len(devices.cpus)} core(s)",
        "isa": " ".join(isa) or "none of " + " ".join(ISA_FLAGS),
        "gpus": devices.describe() if devices.gpus else "none",
        "backend": backend,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
    }
