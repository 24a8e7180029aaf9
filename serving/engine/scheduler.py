"""Which sequences run in the next step, and how many tokens each: the three policies over one block budget.

No torch here (tested with a fake block budget and no model). Every step is schedule() -> the runner computes
the scheduled tokens -> postprocess() appends sampled tokens, stops finished requests and frees their blocks.

Policies (config.scheduler.policy):
- request: one request at a time in queue order; the next starts when it finishes.
- static: gather up to max_num_seqs waiting requests (or whatever arrived within batch_wait_ms), run that
  batch until all of it finishes; later arrivals wait for the next batch.
- continuous: iteration level (Orca): after every step finished sequences leave and waiting ones join,
  within max_num_seqs and max_num_batched_tokens; with chunked_prefill a long prompt is split across steps.
When blocks run out, new requests wait and running ones are preempted (blocks freed, recomputed later).
With cache.enable_prefix_caching, an admitted request first shares the cached blocks of its longest cached
prefix (block_manager.match_prefix) and computes only the rest; a preempted one finds its own blocks again.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from serving.config import SchedulerConfig
from serving.engine.block_manager import BlockManager
from serving.engine.outputs import FinishReason, RequestOutput
from serving.engine.sequence import Sequence, SequenceStatus

QueueKey = Callable[[Sequence], Any]

QUEUE_KEYS: dict[str, QueueKey] = {
    "fcfs": lambda s: (s.arrival_time, s.seq_id),
    "priority": lambda s: (s.priority, s.arrival_time, s.seq_id),
    "sjf": lambda s: (s.num_prompt_tokens, s.arrival_time, s.seq_id),
}
"""Sort keys of the waiting queue: smaller runs first; arrival then admission order break ties."""


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step."""

    seq: Sequence
    start: int
    """Position of the first token computed this step (= seq.num_computed_tokens when scheduled)."""
    num_tokens: int
    """Tokens computed this step: the whole prompt, a prefill chunk, or 1 for a decode."""
    sample: bool
    """True when the step reaches the sequence's last token, so a new token is sampled from its logits."""

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start > 0


@dataclass
class SchedulerOutput:
    """What the runner computes in one step; rows in this order form the flattened batch."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    """Sequences of this step, running ones (decodes, prefill chunks) first, then newly admitted ones."""
    num_batched_tokens: int = 0
    """Sum of num_tokens over scheduled: the step's token count (<= max_num_batched_tokens)."""
    preempted: list[Sequence] = field(default_factory=list)
    """Sequences that lost their blocks this step; they wait and recompute prompt + output later."""

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_sampled(self) -> int:
        return sum(s.sample for s in self.scheduled)


class Scheduler:
    """Queues, admission and preemption for one engine; the block manager says what fits."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        *,
        max_model_len: int,
        eos_token_ids: Collection[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.clock = clock
        self.key: QueueKey = QUEUE_KEYS[config.queue_order]
        self.max_num_seqs = 1 if config.policy == "request" else config.max_num_seqs
        self.waiting: list[Sequence] = []
        """Not yet admitted (or preempted), sorted by queue key."""
        self.batch: list[Sequence] = []
        """request/static: members of the current batch not yet admitted, sorted by queue key."""
        self.running: list[Sequence] = []
        """Hold blocks: decoding or part-way through a chunked prefill."""
        self.num_preemptions = 0
        self.num_prefix_query_tokens = 0
        """Tokens of admitted sequences (counted at each admission): the prefix cache's lookups."""
        self.num_prefix_hit_tokens = 0
        """Of those, tokens found in the prefix cache (not computed again)."""
        self._seqs: dict[str, Sequence] = {}

    # --- queue state ---------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._seqs:
            raise ValueError(f"request_id {seq.request_id!r} is already in the engine: use a unique id")
        seq.status = SequenceStatus.WAITING
        self._seqs[seq.request_id] = seq
        bisect.insort(self.waiting, seq, key=self.key)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.batch)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is and free its blocks; None when it is unknown or already done."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        for queue in (self.waiting, self.batch, self.running):
            if seq in queue:
                queue.remove(seq)
        self._finish(seq, "abort")
        return seq

    # --- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences: running ones first (preempting if blocks run out), then admissions."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_admissions(out, budget)
        out.num_batched_tokens = sum(s.num_tokens for s in out.scheduled)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        pending = sorted(self.running, key=self.key)
        kept: list[Sequence] = []
        while pending:
            seq = pending.pop(0)
            n = seq.num_uncomputed_tokens
            if self.config.chunked_prefill:
                n = min(n, budget)
            if n == 0 or n > budget:
                kept.append(seq)
                continue
            while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                victim = pending.pop() if pending else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self._take(out, seq, n)
            kept.append(seq)
            budget -= n
        self.running = kept
        return budget

    def _schedule_admissions(self, out: SchedulerOutput, budget: int) -> None:
        queue = self._admission_queue()
        while queue and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = queue[0]
            hit = self.block_manager.match_prefix(seq)
            n = seq.num_uncomputed_tokens
            if n > budget and self.config.chunked_prefill:
                n = budget
            if n > budget or not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                self.block_manager.free(seq)  # undo the prefix match: it waits holding nothing
                seq.num_computed_tokens = 0
                break
            queue.pop(0)
            self.num_prefix_query_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += hit
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._take(out, seq, n)
            budget -= n

    def _admission_queue(self) -> list[Sequence]:
        """continuous: the waiting queue; request/static: the current batch, formed once the last is done."""
        if self.config.policy == "continuous":
            return self.waiting
        if not self.running and not self.batch and self._batch_ready():
            self.batch = self.waiting[: self.max_num_seqs]
            del self.waiting[: self.max_num_seqs]
        return self.batch

    def seconds_until_batch(self) -> float:
        """static: how long until the gathering batch is due (0 when something can run now)."""
        if self.config.policy != "static" or self.running or self.batch or not self.waiting:
            return 0.0
        if len(self.waiting) >= self.max_num_seqs:
            return 0.0
        oldest = min(s.arrival_time for s in self.waiting)
        return max(0.0, oldest + self.config.batch_wait_ms / 1000.0 - self.clock())

    def _batch_ready(self) -> bool:
        if not self.waiting:
            return False
        if self.config.policy == "request" or len(self.waiting) >= self.max_num_seqs:
            return True
        oldest = min(s.arrival_time for s in self.waiting)
        return self.clock() - oldest >= self.config.batch_wait_ms / 1000.0

    def _take(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        self.block_manager.allocate(seq, start + n)
        out.scheduled.append(ScheduledSequence(seq, start, n, sample=start + n == seq.num_tokens))

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks; it recomputes prompt + output so far when admitted again."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        queue = self.waiting if self.config.policy == "continuous" else self.batch
        bisect.insort(queue, seq, key=self.key)

    # --- after the step ------------------------------------------------------------------------

    def postprocess(self, out: SchedulerOutput, sampled: list[int]) -> list[RequestOutput]:
        """Record computed tokens, append sampled ones (one per sampling row, in order), finish and free."""
        outputs: list[RequestOutput] = []
        tokens = iter(sampled)
        finished = False
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            self.block_manager.cache_computed(seq)
            if not item.sample:
                continue
            token = next(tokens)
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason)
                finished = True
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=[token],
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_output_tokens=seq.num_output_tokens,
                    finished=reason is not None,
                    finish_reason=reason,
                )
            )
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.request_id]
