"""What the engine hands back: per-request increments and a snapshot of its queues and cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token that is there, its log-probability and rank, and the best alternatives."""

    token_id: int
    logprob: float
    rank: int
    """1 for the most likely token (ties share the better rank)."""
    top: tuple[tuple[int, float], ...] = ()
    """The `n` most likely (token id, logprob) at this position, most likely first."""


@dataclass
class RequestOutput:
    """New tokens of one request from one step (streamed to the client as one chunk)."""

    request_id: str
    new_token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    """Output tokens so far, including new_token_ids."""
    finished: bool
    finish_reason: FinishReason | None
    new_logprobs: list[TokenLogprob] | None = None
    """One per new token when the request asked for logprobs."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """On a request's first output when it asked for prompt logprobs: prompt tokens 1.. (0 has none)."""


@dataclass(frozen=True)
class EngineStats:
    """Queue and cache occupancy, for /metrics and for tests that check every block is freed."""

    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
