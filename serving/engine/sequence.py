"""One request's state as it moves waiting -> running -> finished (and back to waiting when preempted)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from serving.engine.outputs import FinishReason
from serving.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token ids, progress and KV blocks of one request. The scheduler owns it; the runner only reads it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    """Lower runs first under queue_order=priority."""
    arrival_time: float = 0.0
    """Engine clock at add_request; breaks ties in every queue order."""
    seq_id: int = 0
    """Admission counter; the final tie-break, so queue keys are total."""
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    """Prompt followed by the generated tokens."""
    num_computed_tokens: int = 0
    """Tokens whose K/V sit in the cache; reset to 0 on preemption (recompute)."""
    block_table: list[int] = field(default_factory=list)
    """KV block ids in token order: token i lives in block_table[i // block_size]."""
    num_cached_blocks: int = 0
    """Leading blocks of block_table that are in the prefix cache (shared or put there by this sequence)."""
    block_keys: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the full blocks of token_ids hashed so far (a function of the tokens alone)."""
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
