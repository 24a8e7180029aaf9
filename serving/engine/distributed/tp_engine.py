"""Rank 0 of a tensor-parallel replica: the ordinary LLMEngine over the sharded model, plus the step
broadcast (a forward pre-hook) and the metrics of the group."""

from __future__ import annotations

import os
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from serving.config import DeploymentConfig
from serving.engine.distributed.build import RankGroup
from serving.engine.distributed.metrics import ParallelCollector
from serving.engine.distributed.placement import ALLREDUCE_ENV
from serving.engine.distributed.tensor_parallel import AllReduceTimer, StepBroadcaster
from serving.engine.llm_engine import LLMEngine, eos_token_ids
from serving.engine.outputs import RequestOutput


class TensorParallelEngine(LLMEngine):
    """Scheduler, block manager and sampling on rank 0; every forward runs on all tp ranks."""

    def __init__(
        self,
        config: DeploymentConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        group: RankGroup,
        num_blocks: int,
    ) -> None:
        super().__init__(config, model, eos_token_ids=eos_token_ids(model, tokenizer), num_blocks=num_blocks)
        self.tokenizer = tokenizer
        self.group = group
        self.broadcaster = StepBroadcaster(group.workers)
        self.broadcaster.attach(model)
        self.allreduce = AllReduceTimer()
        self.allreduce.install()
        self.allreduce_impl = os.environ.get(ALLREDUCE_ENV, "shm")
        self.num_steps = 0

    def step(self) -> list[RequestOutput]:
        outputs = super().step()
        if not self.last_step_idle:
            self.group.busy[0].add(self.last_step_seconds)
            self.num_steps += 1
        return outputs

    def register_metrics(self, registry: CollectorRegistry, labels: dict[str, str] | None = None) -> None:
        registry.register(ParallelCollector(self, labels or {}))

    def close(self) -> None:
        self.group.stop()
