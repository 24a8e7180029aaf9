"""Rank 0 of a tensor-parallel replica: the ordinary LLMEngine step over the sharded model, plus the step
broadcast (a forward pre-hook: every forward runs on all tp ranks) and the group's metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from serving.config import DeploymentConfig
from serving.engine.distributed.metrics import FamiliesCollector, tensor_parallel_families
from serving.engine.distributed.rank_group import RankGroup, RankGroupEngine, RankModel
from serving.engine.distributed.tensor_parallel import AllReduceTimer, StepBroadcaster
from serving.engine.outputs import RequestOutput


class TensorParallelEngine(RankGroupEngine):
    """Scheduler, block manager and sampling on rank 0; every forward runs on all tp ranks."""

    def __init__(self, config: DeploymentConfig, part: RankModel, tokenizer: Any, group: RankGroup) -> None:
        super().__init__(config, part, tokenizer, group)
        self.broadcaster = StepBroadcaster(group.workers)
        self.broadcaster.attach(part.model)
        self.allreduce = AllReduceTimer()
        self.allreduce.install()
        self.num_steps = 0

    def step(self) -> list[RequestOutput]:
        outputs = super().step()
        if not self.last_step_idle:
            self.num_steps += 1
        return outputs

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(
            FamiliesCollector(
                lambda: tensor_parallel_families(
                    self.group.allreduce,
                    self.allreduce.seconds,
                    self.allreduce.calls,
                    self.num_steps,
                    self.broadcaster.seconds,
                )
            )
        )
