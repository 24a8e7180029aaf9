"""Tensor parallelism through DeepSpeed AutoTP, and the step broadcast from rank 0 to the other ranks.

Rank 0 owns the scheduler and the KV block manager. Before each forward it sends the model's keyword
arguments (token ids, positions, logits_to_keep and the attention metadata, whose tensors say where every
token's K/V goes) to every other rank, pickled once; the other ranks run the same forward on their shard
of each layer and DeepSpeed all-reduces the partial outputs (o_proj, down_proj, lm_head). Only rank 0
samples. Each rank's KV cache holds its own KV heads (k_proj outputs / head_dim), so the KV memory of a
replica is split across its ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from serving.engine.distributed.process import Child
from serving.engine.distributed.step_codec import encode, strip_caches

DIST_TIMEOUT = timedelta(minutes=30)
"""Collectives wait this long; a dead rank is caught by the watchdog long before."""


def dist_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tensor_parallel(device: torch.device, allreduce: str) -> None:
    """deepspeed.comm over the RANK/WORLD_SIZE/MASTER_* environment (set by placement.RankSpec.env);
    `allreduce` is the group's resolved parallel.allreduce (the same on every rank): anything but `shm`
    switches DeepSpeed's shared-memory all-reduce off."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm

    deepspeed.init_distributed(
        dist_backend=dist_backend(device), auto_mpi_discovery=False, timeout=DIST_TIMEOUT
    )
    if allreduce != "shm" and ds_comm.cdb is not None:
        ds_comm.cdb.shm_vector_kernel_level = 0  # DeepSpeed then calls torch.distributed.all_reduce


def shard_model(model: torch.nn.Module, tp: int, dtype: torch.dtype) -> torch.nn.Module:
    """AutoTP: split every nn.Linear of the transformers model across tp ranks (kernels not injected)."""
    import deepspeed

    engine = deepspeed.init_inference(
        model, tensor_parallel={"tp_size": tp}, dtype=dtype, replace_with_kernel_inject=False
    )
    sharded: torch.nn.Module = engine.module
    sharded.eval()
    return sharded


class AllReduceTimer:
    """Wraps deepspeed.comm.inference_all_reduce to add up the time rank 0 spends in it (including any
    wait for slower ranks): serving_tp_allreduce_seconds_total."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._original: Callable[..., Any] | None = None

    def install(self) -> None:
        import deepspeed.comm as ds_comm

        original = ds_comm.inference_all_reduce
        self._original = original

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        ds_comm.inference_all_reduce = timed


class StepBroadcaster:
    """A forward pre-hook on rank 0's model: the forward's kwargs go to every other rank first."""

    def __init__(self, followers: Sequence[Child]) -> None:
        self.followers = list(followers)
        self.seconds = 0.0

    def attach(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        start = time.perf_counter()
        data = encode(("step", args, strip_caches(kwargs)))
        for child in self.followers:
            child.send_bytes(data)
        self.seconds += time.perf_counter() - start
