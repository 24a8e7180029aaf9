"""The machine a bench result comes from: CPU model and the ISA extensions that decide GEMM speed."""

from __future__ import annotations

import os
import subprocess

ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "amx_bf16",
    "amx_fp16",
    "amx_int8",
)


def machine() -> dict[str, str]:
    """lscpu's model name, the ISA flags above that it lists, and the cores this process may use."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    return {
        "model": info.get("Model name", "?").strip(),
        "isa": " ".join(f for f in ISA_FLAGS if f in flags),
        "cores": str(len(os.sched_getaffinity(0))),
    }
