"""What the engine hands back: per-request increments and a snapshot of its queues and cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


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


@dataclass(frozen=True)
class EngineStats:
    """Queue and cache occupancy, for /metrics and for tests that check every block is freed."""

    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
