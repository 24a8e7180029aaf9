"""Rank 0 of a tensor-parallel replica: the ordinary LLMEngine over the sharded model, plus the step
broadcast (a forward pre-hook) and the metrics of the group."""

from __future__ import annotations

import os
from typing import Any

import torch

from serving.config import DeploymentConfig
from serving.engine.distributed.build import RankGroup
from serving.engine.distributed.group_engine import RankGroupEngine
from serving.engine.distributed.placement import ALLREDUCE_ENV
from serving.engine.distributed.tensor_parallel import AllReduceTimer, StepBroadcaster
from serving.engine.outputs import RequestOutput


class TensorParallelEngine(RankGroupEngine):
    """Scheduler, block manager and sampling on rank 0; every forward runs on all tp ranks."""

    def __init__(
        self,
        config: DeploymentConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        group: RankGroup,
        num_blocks: int,
    ) -> None:
        super().__init__(config, model, tokenizer, group, num_blocks)
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
