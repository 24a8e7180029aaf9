"""Admission control: a bound on the generation requests inside the server, refused before their body.

Without it a flood of requests piles up in the engine's waiting queue (each with its parsed body, token
ids and stream queue) until clients time out. With it the server holds at most what the engine runs at
once plus server.max_waiting; the next request gets 429 with Retry-After at once, so memory stays
bounded and a client learns to back off instead of waiting into its own time-out. A pure ASGI
middleware: the slot is held until the response's last byte (a stream's end) or the disconnect.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.config import DeploymentConfig
from serving.server.errors import APIError

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
RETRY_AFTER_S = 1
"""What a refused client is told to wait: about one batch of decode steps on a small model."""


def running_capacity(config: DeploymentConfig) -> int:
    """Requests the engine runs at once: a batch per replica (one request under policy=request)."""
    per_replica = 1 if config.scheduler.policy == "request" else config.scheduler.max_num_seqs
    return config.parallel.dp * per_replica


class Admission:
    """Counts generation requests in the server against limit (None: unbounded)."""

    def __init__(self, limit: int | None, registry: CollectorRegistry) -> None:
        self.limit = limit
        self.in_flight = 0
        self.in_flight_gauge = Gauge(
            "serving_admitted_requests", "Generation requests inside the server.", registry=registry
        )
        self.rejected = Counter(
            "serving_admission_rejected",
            "Generation requests refused with 429 because the server was full.",
            registry=registry,
        )

    @classmethod
    def from_config(cls, config: DeploymentConfig, registry: CollectorRegistry) -> Admission:
        waiting = config.server.max_waiting
        return cls(None if waiting is None else running_capacity(config) + waiting, registry)

    def try_enter(self) -> bool:
        if self.limit is not None and self.in_flight >= self.limit:
            self.rejected.inc()
            return False
        self.in_flight += 1
        self.in_flight_gauge.set(self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        self.in_flight_gauge.set(self.in_flight)


class AdmissionMiddleware:
    """Refuses generation requests beyond Admission.limit with an OpenAI-style 429 body."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.admission.try_enter():
            await _full(self.admission.limit or 0).send(send, {"retry-after": str(RETRY_AFTER_S)})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()


def _full(limit: int) -> APIError:
    return APIError(
        f"The server is full: {limit} requests are running or waiting (server.max_waiting plus what the "
        f"engine runs at once); retry after {RETRY_AFTER_S} s",
        status=429,
        type="server_overloaded",
        code="too_many_requests",
    )
