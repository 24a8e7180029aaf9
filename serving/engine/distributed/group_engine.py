"""Rank 0's engine of a multi-process replica: the ordinary LLMEngine plus the group of worker ranks it
drives, whose metrics it exports and which it stops on close. TensorParallelEngine and PipelineEngine
differ only in how a step reaches the other ranks."""

from __future__ import annotations

from typing import Any

import torch
from prometheus_client import CollectorRegistry

from serving.config import DeploymentConfig
from serving.engine.distributed.build import RankGroup
from serving.engine.distributed.metrics import ParallelCollector
from serving.engine.llm_engine import LLMEngine, eos_token_ids


class RankGroupEngine(LLMEngine):
    """LLMEngine on rank 0 that owns the replica's RankGroup."""

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

    def register_metrics(self, registry: CollectorRegistry, labels: dict[str, str] | None = None) -> None:
        registry.register(ParallelCollector(self, labels or {}))

    def close(self) -> None:
        self.group.stop()
