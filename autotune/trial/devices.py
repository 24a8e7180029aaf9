"""What a trial can run on: GPUs found through NVML, else the CPU cores and RAM of this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_bytes: int
    free_bytes: int | None = None
    """Free memory when the study started (other processes' allocations excluded); None if unknown."""
    nvlink_peers: tuple[int, ...] = ()
    """GPUs this one reaches over NVLink: a tensor-parallel group is placed on GPUs linked to each other."""


@dataclass(frozen=True)
class Devices:
    """The hardware a study plans against; tests build one by hand to plan for other machines."""

    cpus: tuple[int, ...]
    """CPU cores this process may use (its affinity mask)."""
    ram_bytes: int
    """Memory available to trials on the CPU: free RAM when the study starts."""
    gpus: tuple[Gpu, ...] = ()
    """NVIDIA GPUs; empty when NVML is absent (the usual CPU-only case)."""
    cpu_flags: frozenset[str] = frozenset()
    """The CPU's ISA flags (/proc/cpuinfo: avx512_bf16, amx_bf16, ...): which dtypes have fast kernels."""

    @property
    def kind(self) -> Literal["cuda", "cpu"]:
        return "cuda" if self.gpus else "cpu"

    @property
    def count(self) -> int:
        """Devices ranks are placed on: GPUs, else CPU cores."""
        return len(self.gpus) if self.gpus else len(self.cpus)

    def describe(self) -> str:
        if self.gpus:
            names = ", ".join(f"{g.index}:{g.name} {g.memory_bytes / 2**30:.1f} GiB" for g in self.gpus)
            linked = sum(len(g.nvlink_peers) for g in self.gpus) // 2
            return f"{len(self.gpus)} GPU(s): {names}; {linked} NVLink pair(s)"
        return f"{len(self.cpus)} CPU core(s), {self.ram_bytes / 2**30:.1f} GiB RAM available"


def detect_gpus() -> tuple[Gpu, ...]:
    """GPUs through pynvml; a missing NVML library or driver means no GPUs, not an error."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # NVMLError_LibraryNotFound / DriverNotLoaded: a machine without GPUs
        return ()
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        gpus = []
        for index, handle in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            peers = tuple(
                other for other, peer in enumerate(handles) if other != index and _nvlinked(handle, peer)
            )
            gpus.append(
                Gpu(
                    index=index,
                    name=name if isinstance(name, str) else name.decode(),
                    memory_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                    nvlink_peers=peers,
                )
            )
        return tuple(gpus)
    finally:
        pynvml.nvmlShutdown()


def _nvlinked(handle: object, peer: object) -> bool:
    """NVML's P2P status over NVLink; drivers without the query report no link."""
    import pynvml

    try:
        status = pynvml.nvmlDeviceGetP2PStatus(handle, peer, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
    except pynvml.NVMLError:
        return False
    return bool(status == pynvml.NVML_P2P_STATUS_OK)


def detect_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def detect_devices(device: str = "auto") -> Devices:
    """This machine's devices; `device=cpu` ignores GPUs even when present."""
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    ram = int(psutil.virtual_memory().available)
    gpus = () if device == "cpu" else detect_gpus()
    return Devices(cpus=cpus, ram_bytes=ram, gpus=gpus, cpu_flags=detect_cpu_flags())
