"""Build one replica's engine over tp x pp ranks: rank 0 is this process, ranks 1.. are spawned workers.

Order: validate -> plan ranks (cores or GPUs) -> spawn workers (watchdog on) -> join the process group ->
load the same seeded model on every rank -> shard it (TP) or cut it to a stage (PP) -> size the KV
cache identically on every rank -> wait until every worker is ready.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from serving.config import DeploymentConfig
from serving.engine.block_manager import kv_bytes_per_token, num_blocks_for_budget
from serving.engine.distributed.busy import BusyMeter
from serving.engine.distributed.placement import RankSpec, pin_this_process, plan_ranks
from serving.engine.distributed.process import CONFIG_ENV, Child, Watchdog, spawn, stop_children
from serving.engine.distributed.validate import validate_for_launch

log = logging.getLogger("serving")

WORKER_MODULE = "serving.engine.distributed.worker"
CPUS_ENV = "SERVING_PARALLEL_CPUS"


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    device: torch.device


def rank_context(config: DeploymentConfig, rank: int) -> RankContext:
    """Pin this rank to its cores (env set by rank 0), pick its device, join the process group."""
    from serving.engine.distributed.tensor_parallel import dist_backend, init_tensor_parallel
    from serving.engine.model_loader import resolve_device

    cpus = os.environ.get(CPUS_ENV)
    if cpus:
        pin_this_process([int(c) for c in cpus.split(",")])
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)  # CUDA_VISIBLE_DEVICES shows this rank one GPU
        device = torch.device("cuda", 0)
    world = config.parallel.tp * config.parallel.pp
    if config.parallel.tp > 1:
        init_tensor_parallel(device)
    else:
        import torch.distributed as dist

        from serving.engine.distributed.tensor_parallel import DIST_TIMEOUT

        dist.init_process_group(dist_backend(device), rank=rank, world_size=world, timeout=DIST_TIMEOUT)
    return RankContext(rank, world, device)


def load_rank_model(
    config: DeploymentConfig, ctx: RankContext
) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """This rank's part of the model and its KV caches (indexed by global layer)."""
    from serving.engine.attention import attn_implementation_name
    from serving.engine.model_loader import TORCH_DTYPES, load_model
    from serving.engine.model_runner import ModelRunner

    model: torch.nn.Module = load_model(config, attn_implementation_name(config.attention), ctx.device)
    num_blocks = replica_num_blocks(config, model)
    start, num_layers = 0, 0
    if config.parallel.tp > 1:
        from serving.engine.distributed.tensor_parallel import shard_model

        model = shard_model(model, config.parallel.tp, TORCH_DTYPES[config.precision.dtype])
    else:
        from serving.engine.distributed.pipeline import decoder_of, make_stage

        num_layers = len(decoder_of(model).layers)
        start, _ = make_stage(model, ctx.rank, config.parallel.pp)
    runner = ModelRunner(
        model,
        attention=config.attention,
        num_blocks=num_blocks,
        block_size=config.cache.block_size,
        device=ctx.device,
    )
    caches = runner.kv_caches
    if config.parallel.pp > 1:
        from serving.engine.distributed.pipeline import global_caches

        caches = global_caches(caches, start, num_layers)
    return model, caches


def replica_num_blocks(config: DeploymentConfig, model: torch.nn.Module) -> int:
    """KV blocks of the whole replica from cache.kv_cache_memory_gb and the unsharded model (all layers,
    all KV heads): every rank computes the same count, and the replica uses the budget once in total."""
    from serving.engine.model_runner import kv_cache_layout, model_dtype

    num_layers, num_kv_heads, head_dim = kv_cache_layout(model)
    dtype_bytes = torch.empty((), dtype=model_dtype(model)).element_size()
    per_token = kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes)
    return num_blocks_for_budget(config.cache.kv_cache_memory_gb, config.cache.block_size, per_token)


class RankGroup:
    """Rank 0's view of its workers: their processes, pipes, reported busy time and the watchdog."""

    def __init__(self, config: DeploymentConfig, specs: list[RankSpec]) -> None:
        self.config = config
        self.specs = specs
        self.busy = [BusyMeter() for _ in specs]
        """Per rank; rank 0's is updated in place, the others from their reports."""
        self.workers: list[Child] = []
        self.watchdog: Watchdog | None = None
        self._ready = threading.Semaphore(0)
        self._stopped = False

    def spawn(self) -> None:
        yaml_text = self.config.to_yaml()
        for spec in self.specs[1:]:
            env = {**spec.env(), CONFIG_ENV: yaml_text, CPUS_ENV: ",".join(map(str, spec.cpus))}
            self.workers.append(spawn(f"rank {spec.rank}", WORKER_MODULE, env))
        self.watchdog = Watchdog(self.workers)
        self.watchdog.start()
        for worker in self.workers:
            threading.Thread(
                target=self._read, args=(worker,), name=f"{worker.name}-reader", daemon=True
            ).start()
        atexit.register(self.stop)

    def _read(self, worker: Child) -> None:
        rank = int(worker.name.split()[-1])
        while True:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                return  # the watchdog sees the exit
            if message[0] == "ready":
                self._ready.release()
            elif message[0] == "busy":
                self.busy[rank].set_total(message[1], message[2])

    def wait_ready(self) -> None:
        for _ in self.workers:
            self._ready.acquire()

    def stop(self) -> None:
        """Orderly stop of the workers (idempotent; also registered with atexit)."""
        if self._stopped:
            return
        self._stopped = True
        stop_children(self.workers, self.watchdog)


def build_parallel_engine(config: DeploymentConfig) -> Any:
    """An LLMEngine for config (tp > 1 or pp > 1): TensorParallelEngine or PipelineEngine, workers ready."""
    from serving.engine.model_loader import load_tokenizer, resolve_device

    validate_for_launch(config)
    device = resolve_device(config.device)
    world = config.parallel.tp * config.parallel.pp
    specs = plan_ranks(world, device.type, config.parallel.allreduce)
    os.environ.update(specs[0].env())  # DeepSpeed's shm all-reduce reads LOCAL_SIZE/MASTER_* from here
    pin_this_process(specs[0].cpus)
    group = RankGroup(config, specs)
    group.spawn()
    log.info(
        "parallel: tp=%d pp=%d, %d ranks on cpus %s",
        config.parallel.tp,
        config.parallel.pp,
        world,
        [list(s.cpus) for s in specs],
    )
    ctx = rank_context(config, 0)
    tokenizer = load_tokenizer(config.model)
    model, num_blocks = _load_rank0(config, ctx)
    if config.parallel.tp > 1:
        from serving.engine.distributed.tp_engine import TensorParallelEngine

        engine: Any = TensorParallelEngine(config, model, tokenizer, group, num_blocks)
    else:
        from serving.engine.distributed.pipeline_engine import PipelineEngine

        engine = PipelineEngine(config, model, tokenizer, group, num_blocks)
    group.wait_ready()
    log.info("parallel: all %d ranks ready", world)
    return engine


def _load_rank0(config: DeploymentConfig, ctx: RankContext) -> tuple[torch.nn.Module, int]:
    """Rank 0's model (sharded or cut to stage 0) before its engine sizes the KV cache."""
    from serving.engine.attention import attn_implementation_name
    from serving.engine.model_loader import TORCH_DTYPES, load_model

    model: torch.nn.Module = load_model(config, attn_implementation_name(config.attention), ctx.device)
    num_blocks = replica_num_blocks(config, model)
    if config.parallel.tp > 1:
        from serving.engine.distributed.tensor_parallel import shard_model

        model = shard_model(model, config.parallel.tp, TORCH_DTYPES[config.precision.dtype])
    return model, num_blocks
