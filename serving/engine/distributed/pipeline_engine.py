"""Rank 0 of a pipeline-parallel replica: stage 0, the scheduler, and several micro-batches in flight.

One step() launches micro-batches until `depth` are in flight (each: schedule the sequences not already
in flight, run stage 0, send the hidden states on), then completes the oldest one (waits for the last
stage's tokens, samples, postprocesses). With the continuous policy depth = pp, so while stage 1 computes
micro-batch B, stage 0 computes the next micro-batch of the sequences A just finished: the stages
overlap instead of idling (the bubble). request/static policies keep one batch at a time (depth 1):
their batches are defined to wait for each other. scheduler.max_num_seqs bounds each micro-batch.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from serving.config import DeploymentConfig
from serving.engine.distributed.metrics import FamiliesCollector, pipeline_families
from serving.engine.distributed.pipeline import (
    TAG_HIDDEN,
    TAG_LOGITS,
    TAG_TOKENS,
    decoder_of,
    global_caches,
    run_stage,
    tag,
)
from serving.engine.distributed.rank_group import RankGroup, RankGroupEngine, RankModel
from serving.engine.distributed.step_codec import encode, strip_caches
from serving.engine.model_runner import ModelRunner, model_dtype
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import ScheduledSequence, SchedulerOutput


@dataclass
class MicroBatch:
    """One step's sequences on their way through the stages."""

    id: int
    out: SchedulerOutput
    sampling_rows: list[ScheduledSequence]
    """Rows that sample, in the order of the last stage's logits."""
    random_rows: list[int]
    """Indices into sampling_rows of rows that sample randomly (their logits come back too)."""
    tokens: torch.Tensor
    logits: torch.Tensor | None
    works: list[Any]
    """Pending isend/irecv handles; the tensors above stay alive until they complete."""
    hidden: torch.Tensor
    started: float

    def wait(self) -> None:
        for work in self.works:
            work.wait()


class PipelineRunner(ModelRunner):
    """Stage 0's runner: builds the step (as ModelRunner.execute), computes stage 0, sends it on."""

    def __init__(
        self, config: DeploymentConfig, part: RankModel, group: RankGroup, device: torch.device
    ) -> None:
        model = part.model
        super().__init__(
            model,
            attention=config.attention,
            num_blocks=part.num_blocks,
            block_size=config.cache.block_size,
            device=device,
        )
        self.kv_caches = global_caches(self.kv_caches, part.first_layer, part.num_layers)
        self.group = group
        self.pp = config.parallel.pp
        self.hidden_size = int(decoder_of(model).embed_tokens.embedding_dim)
        self.vocab_size = int(getattr(model, "config").vocab_size)  # noqa: B009
        self.dtype = model_dtype(model)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, mb_id: int) -> MicroBatch:
        rows, kwargs = self.step_inputs(out)
        sampling_rows = [r for r in rows if r.sample]
        random_rows = [i for i, r in enumerate(sampling_rows) if not r.seq.params.greedy]
        shape = (1, kwargs["input_ids"].shape[1], self.hidden_size)
        message = ("stage", mb_id, shape, self.dtype, strip_caches(kwargs), random_rows)
        data = encode(message)
        for worker in self.group.workers:
            worker.send_bytes(data)
        started = time.perf_counter()
        hidden = run_stage(self.model, True, False, kwargs, None).contiguous()
        self.group.busy[0].add(time.perf_counter() - started)
        works = [dist.isend(hidden, dst=1, tag=tag(mb_id, TAG_HIDDEN))]
        last = self.pp - 1
        tokens = torch.empty(len(sampling_rows), dtype=torch.long, device=self.device)
        works.append(dist.irecv(tokens, src=last, tag=tag(mb_id, TAG_TOKENS)))
        logits = None
        if random_rows:
            logits = torch.empty(len(random_rows), self.vocab_size, dtype=self.dtype, device=self.device)
            works.append(dist.irecv(logits, src=last, tag=tag(mb_id, TAG_LOGITS)))
        return MicroBatch(mb_id, out, sampling_rows, random_rows, tokens, logits, works, hidden, started)

    @torch.inference_mode()
    def finish(self, mb: MicroBatch) -> list[int]:
        """Wait for the last stage; one token per sampling row, in the scheduler's row order."""
        mb.wait()
        tokens: list[int] = mb.tokens.tolist()
        if mb.logits is not None:
            rows = [mb.sampling_rows[i] for i in mb.random_rows]
            for i, token in zip(mb.random_rows, self._sample(mb.logits, rows), strict=True):
                tokens[i] = token
        by_seq = {id(r.seq): t for r, t in zip(mb.sampling_rows, tokens, strict=True)}
        return [by_seq[id(r.seq)] for r in mb.out.scheduled if r.sample]


class PipelineEngine(RankGroupEngine):
    """Rank 0's engine whose step keeps up to `depth` micro-batches of disjoint sequences in the pipeline."""

    def __init__(self, config: DeploymentConfig, part: RankModel, tokenizer: Any, group: RankGroup) -> None:
        """part: stage 0, already cut (rank_group.load_rank_model)."""
        super().__init__(config, part, tokenizer, group)
        device = next(iter(part.model.parameters())).device
        self.runner: PipelineRunner = PipelineRunner(config, part, group, device)
        self.pp_size = config.parallel.pp
        self.depth = config.parallel.pp if config.scheduler.policy == "continuous" else 1
        self.inflight: deque[MicroBatch] = deque()
        self.peak_inflight = 0
        """Most micro-batches in flight at once so far (tests check the stages really overlap)."""
        self._ids = itertools.count()
        self._last_complete = time.perf_counter()

    def has_unfinished(self) -> bool:
        return bool(self.inflight) or super().has_unfinished()

    def validate_request(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Logprobs need every row's logits on rank 0; the last stage sends back only random rows'."""
        super().validate_request(prompt_token_ids, params)
        if params.logprobs is not None or params.prompt_logprobs is not None:
            raise ValueError(
                f"logprobs are not computed with parallel.pp={self.pp_size} (pipeline parallel): "
                "drop logprobs/echo, or serve with parallel.pp=1"
            )

    def step(self) -> list[RequestOutput]:
        """Fill the pipeline, then complete the oldest micro-batch ([] and idle when none is in flight)."""
        while len(self.inflight) < self.depth:
            out = self._schedule_free()
            if out.is_empty:
                break
            if not self.inflight:
                self._last_complete = time.perf_counter()
            self.inflight.append(self.runner.launch(out, next(self._ids)))
            self.peak_inflight = max(self.peak_inflight, len(self.inflight))
        self.last_step_idle = not self.inflight
        if not self.inflight:
            return []
        return self._complete(self.inflight.popleft())

    def _schedule_free(self) -> SchedulerOutput:
        """schedule() over the sequences not already in flight (hidden from the scheduler meanwhile)."""
        sched = self.scheduler
        if not self.inflight:
            return sched.schedule()
        busy = {id(item.seq) for mb in self.inflight for item in mb.out.scheduled}
        hidden = [s for s in sched.running if id(s) in busy]
        sched.running = [s for s in sched.running if id(s) not in busy]
        try:
            return sched.schedule()
        finally:
            sched.running = sched.running + hidden

    def _complete(self, mb: MicroBatch) -> list[RequestOutput]:
        sampled = iter(self.runner.finish(mb))
        live: list[ScheduledSequence] = []
        tokens: list[int] = []
        for item in mb.out.scheduled:
            token = next(sampled) if item.sample else None
            if item.seq.is_finished:  # aborted while in flight: its blocks are already free
                continue
            live.append(item)
            if token is not None:
                tokens.append(token)
        out = SchedulerOutput(scheduled=live, num_batched_tokens=sum(i.num_tokens for i in live))
        outputs = self.scheduler.postprocess(out, tokens)
        now = time.perf_counter()
        self.last_step_seconds = now - max(self._last_complete, mb.started)
        self._last_complete = now
        self.account(outputs)
        return outputs

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(FamiliesCollector(lambda: pipeline_families(self.group.busy, len(self.inflight))))

    def close(self) -> None:
        for mb in self.inflight:
            mb.wait()
        self.inflight.clear()
        super().close()
