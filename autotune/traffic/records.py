"""One request's outcome as measured by the client; a row of records.jsonl."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAILURE_KINDS = (
    "http_error",  # the server answered with a non-200 status (reason carries it: http_500 ...)
    "timeout",  # no complete answer within client.timeout_s
    "connect_error",  # could not open the connection
    "stream_dropped",  # the connection closed or broke mid-stream
    "malformed_sse",  # a data: line that is not JSON, or JSON without choices/usage/error
    "server_error_event",  # an SSE message carrying {"error": ...}
    "no_tokens",  # the stream ended without any choices message (no TTFT)
    "client_error",  # anything else raised while sending (reported, never re-raised)
    "abandoned",  # a capacity step stopped early (the SLO target out of reach) while it was in flight
)


@dataclass
class RequestRecord:
    """Times in seconds; `start` and `scheduled` are relative to the benchmark start (perf_counter clock)."""

    index: int
    prompt_len: int | None
    """Prompt tokens: the server's usage.prompt_tokens when reported, else the count the client built."""
    expected_prompt_len: int | None
    expected_output_len: int
    scheduled: float = 0.0
    """When the schedule said to send (closed loop: when a worker became free)."""
    dispatch_lag: float = 0.0
    """Time the client reached the request after `scheduled`: a large value means a slow client."""
    client_queue_time: float = 0.0
    """Wait for the client concurrency cap (vLLM's client_queue_time)."""
    start: float = 0.0
    """t0: perf_counter just before the HTTP request is sent."""
    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    """E2EL: last choices message minus t0."""
    output_tokens: int = 0
    usage_reported: bool = False
    chunks: int = 0
    error_kind: str | None = None
    error: str = ""
    process: int = 0

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**data)


def write_records(records: list[RequestRecord], path: Path) -> None:
    """records.jsonl: one timed request a line, failed ones included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record.as_json()) + "\n")
