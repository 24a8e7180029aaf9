"""One replica over tp x pp ranks: rank 0 is this process, ranks 1.. are spawned workers (worker.py).

Order (start_rank_group): validate -> plan ranks (cores or GPUs, the all-reduce path) -> spawn workers
(watchdog on) -> join the process group -> load the same seeded model on every rank -> shard it (TP) or
cut it to a stage (PP) -> size the KV cache identically on every rank. Rank 0's engine (RankGroupEngine:
TensorParallelEngine or PipelineEngine) is built on that, then waits until every worker is ready.
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
from serving.engine.distributed.process import CONFIG_ENV, CPUS_ENV, Child, Watchdog, spawn, stop_children
from serving.engine.distributed.validate import validate_for_launch
from serving.engine.llm_engine import LLMEngine, eos_token_ids

log = logging.getLogger("serving")

WORKER_MODULE = "serving.engine.distributed.worker"


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    device: torch.device


@dataclass(frozen=True)
class RankModel:
    """This rank's part of the model, and what the replica's KV cache needs to know about the whole."""

    model: torch.nn.Module
    num_blocks: int
    """KV blocks of the replica (the same on every rank)."""
    first_layer: int
    """Global index of this rank's first decoder layer (0 under tensor parallel)."""
    num_layers: int
    """Decoder layers of the unsharded model."""


def rank_context(config: DeploymentConfig, rank: int, allreduce: str) -> RankContext:
    """Pick this rank's device and join the process group (`allreduce`: the group's resolved path)."""
    import torch.distributed as dist

    from serving.engine.distributed.tensor_parallel import DIST_TIMEOUT, dist_backend, init_tensor_parallel
    from serving.engine.model_loader import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)  # CUDA_VISIBLE_DEVICES shows this rank one GPU
        device = torch.device("cuda", 0)
    world = config.parallel.tp * config.parallel.pp
    if config.parallel.tp > 1:
        init_tensor_parallel(device, allreduce)
    else:
        dist.init_process_group(dist_backend(device), rank=rank, world_size=world, timeout=DIST_TIMEOUT)
    return RankContext(rank, world, device)


def load_rank_model(config: DeploymentConfig, ctx: RankContext) -> RankModel:
    """The seeded model, sharded (tp > 1) or cut to this rank's stage (pp > 1); every rank runs this."""
    from serving.engine.distributed.lean_tp import shard_lean
    from serving.engine.distributed.pipeline import decoder_of, make_stage
    from serving.engine.distributed.tensor_parallel import shard_model
    from serving.engine.llama import LeanLlama
    from serving.engine.model_loader import TORCH_DTYPES, load_engine_model
    from serving.engine.weight_layout import relayout_linear_weights

    model: torch.nn.Module = load_engine_model(config, ctx.device)
    num_blocks = replica_num_blocks(config, model)
    if config.parallel.tp > 1:
        if isinstance(model, LeanLlama):  # our forward shards itself; AutoTP knows transformers' only
            model = shard_lean(model, ctx.rank, config.parallel.tp)
            if ctx.device.type == "cpu" and config.precision.dtype == "float32":
                relayout_linear_weights(model)
        else:
            model = shard_model(model, config.parallel.tp, TORCH_DTYPES[config.precision.dtype])
        return RankModel(model, num_blocks, 0, 0)
    num_layers = len(decoder_of(model).layers)
    start, _ = make_stage(model, ctx.rank, config.parallel.pp)
    return RankModel(model, num_blocks, start, num_layers)


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
        """Per rank; rank 0's is updated in place, the others from their reports (pipeline stages)."""
        self.workers: list[Child] = []
        self.watchdog: Watchdog | None = None
        self._ready = threading.Semaphore(0)
        self._stopped = False

    @property
    def allreduce(self) -> str:
        """parallel.allreduce as resolved for this group (`shm` or `process_group`)."""
        return self.specs[0].allreduce

    def spawn(self) -> None:
        """Start ranks 1..; their config carries the resolved all-reduce path, so all ranks agree."""
        yaml_text = self.config.replace(**{"parallel.allreduce": self.allreduce}).to_yaml()
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
        log.info("parallel: all %d ranks ready", len(self.specs))

    def stop(self) -> None:
        """Orderly stop of the workers (idempotent; also registered with atexit)."""
        if self._stopped:
            return
        self._stopped = True
        stop_children(self.workers, self.watchdog)


def start_rank_group(config: DeploymentConfig) -> tuple[RankGroup, RankModel, Any]:
    """Spawn the workers and load rank 0's part: (group, rank 0's model, tokenizer); workers still loading."""
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
    ctx = rank_context(config, 0, group.allreduce)
    tokenizer = load_tokenizer(config.model)
    return group, load_rank_model(config, ctx), tokenizer


class RankGroupEngine(LLMEngine):
    """Rank 0's LLMEngine of a multi-process replica: it owns the RankGroup, stops it on close. The
    tensor- and pipeline-parallel engines differ only in how a step reaches the other ranks."""

    def __init__(self, config: DeploymentConfig, part: RankModel, tokenizer: Any, group: RankGroup) -> None:
        super().__init__(
            config,
            part.model,
            eos_token_ids=eos_token_ids(part.model, tokenizer),
            num_blocks=part.num_blocks,
        )
        self.tokenizer = tokenizer
        self.group = group

    def close(self) -> None:
        self.group.stop()

    def failure(self) -> str | None:
        watchdog = self.group.watchdog
        return watchdog.dead if watchdog is not None else None
