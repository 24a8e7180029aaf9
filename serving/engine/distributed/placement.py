"""Which cores (or GPU) each rank gets, and the environment a rank needs before it imports torch.

Cores are split into contiguous, equal-as-possible shares, one per rank; with more ranks than cores
(parallel.oversubscribe) ranks share cores round-robin with one thread each. A rank sets its own
affinity and torch thread count from its share, so ranks never compete for a core they were not given.
On CUDA every rank sees exactly one GPU through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

MASTER_ADDR = "127.0.0.1"


def split_cpus(cpus: Sequence[int], parts: int) -> list[list[int]]:
    """`parts` contiguous shares of `cpus`; with fewer cpus than parts, one cpu each, round-robin."""
    ordered = sorted(cpus)
    if not ordered:
        raise ValueError("no CPU cores to split: this process's affinity set is empty")
    if parts > len(ordered):
        return [[ordered[i % len(ordered)]] for i in range(parts)]
    base, extra = divmod(len(ordered), parts)
    shares, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        shares.append(ordered[start : start + size])
        start += size
    return shares


def visible_gpus() -> list[str]:
    """GPU ids this process may use: its CUDA_VISIBLE_DEVICES, else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def split_gpus(gpus: Sequence[str], parts: int) -> list[list[str]]:
    """Equal contiguous GPU shares (validate_parallel made sure there are enough)."""
    per = len(gpus) // parts
    if per < 1:
        raise ValueError(f"{parts} ranks or replicas need at least {parts} GPUs, {len(gpus)} are visible")
    return [list(gpus[i * per : (i + 1) * per]) for i in range(parts)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((MASTER_ADDR, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RankSpec:
    """One rank of a tensor- or pipeline-parallel group (one replica)."""

    rank: int
    world_size: int
    master_port: int
    cpus: tuple[int, ...]
    gpu: str | None
    """The one GPU id this rank sees (CUDA), None on CPU."""
    allreduce: str = "shm"
    """parallel.allreduce resolved (`shm` or `process_group`; every rank of a group uses the same): shm
    spins while it waits, so `auto` uses it only when every rank has its own cores."""

    def env(self) -> dict[str, str]:
        """torch.distributed / DeepSpeed variables. LOCAL_SIZE must equal the world size, or DeepSpeed's
        shared-memory all-reduce is not used (and under a plain launcher its init segfaults)."""
        env = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.rank),
            "LOCAL_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.world_size),
            "CROSS_RANK": "0",
            "CROSS_SIZE": "1",
            "MASTER_ADDR": MASTER_ADDR,
            "MASTER_PORT": str(self.master_port),
            "OMP_NUM_THREADS": str(len(self.cpus)),
            "TOKENIZERS_PARALLELISM": "false",
        }
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env


def plan_ranks(world_size: int, device_type: str, allreduce: str = "auto") -> list[RankSpec]:
    """Specs for ranks 0..world_size-1 over this process's cores (or visible GPUs); `allreduce` is
    parallel.allreduce (`auto`: shm when every rank has a core of its own)."""
    port = free_port()
    cpus = list(os.sched_getaffinity(0))
    cpu_shares = split_cpus(cpus, world_size)
    gpus: list[str | None] = [None] * world_size
    if device_type == "cuda":
        gpus = [share[0] for share in split_gpus(visible_gpus(), world_size)]
    if allreduce == "auto":
        allreduce = "shm" if world_size <= len(cpus) else "process_group"
    return [
        RankSpec(rank, world_size, port, tuple(cpu_shares[rank]), gpus[rank], allreduce)
        for rank in range(world_size)
    ]


def pin_this_process(cpus: Sequence[int]) -> None:
    """Restrict this process to `cpus` and size torch's thread pool to them."""
    import torch

    os.sched_setaffinity(0, set(cpus))
    torch.set_num_threads(len(cpus))
