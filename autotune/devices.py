"""What a trial can run on: GPUs found through NVML, else the CPU cores and RAM of this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class Devices:
    """The hardware a study plans against; tests build one by hand to plan for other machines."""

    cpus: tuple[int, ...]
    """CPU cores this process may use (its affinity mask)."""
    ram_bytes: int
    """Memory available to trials on the CPU: free RAM when the study starts."""
    gpus: tuple[Gpu, ...] = ()
    """NVIDIA GPUs; empty when NVML is absent (the usual CPU-only case)."""

    @property
    def kind(self) -> str:
        return "cuda" if self.gpus else "cpu"

    @property
    def count(self) -> int:
        """Devices ranks are placed on: GPUs, else CPU cores."""
        return len(self.gpus) if self.gpus else len(self.cpus)

    def describe(self) -> str:
        if self.gpus:
            names = ", ".join(f"{g.index}:{g.name} {g.memory_bytes / 2**30:.1f} GiB" for g in self.gpus)
            return f"{len(self.gpus)} GPU(s): {names}"
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
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(index, name if isinstance(name, str) else name.decode(), int(memory.total)))
        return tuple(gpus)
    finally:
        pynvml.nvmlShutdown()


def detect_devices(device: str = "auto") -> Devices:
    """This machine's devices; `device=cpu` ignores GPUs even when present."""
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    ram = int(psutil.virtual_memory().available)
    gpus = () if device == "cpu" else detect_gpus()
    return Devices(cpus=cpus, ram_bytes=ram, gpus=gpus)
