"""HTTP-level Prometheus metrics, exposed next to the engine's registry on /metrics.

A pure ASGI middleware (not BaseHTTPMiddleware, which buffers and breaks streaming): it sees the
status when the response starts and times the request until its last body byte, so a streamed
request's duration is its end-to-end latency.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class HTTPMetrics:
    """Counters per route template (never the raw path: unknown paths count as `other`)."""

    def __init__(self, routes: Iterable[str]) -> None:
        self.routes = frozenset(routes)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serving_http_requests",
            "HTTP requests by route and status code.",
            ["path", "status"],
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "serving_http_requests_in_progress",
            "HTTP requests being served.",
            ["path"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "serving_http_request_duration_seconds",
            "Time from request start to the last byte of the response.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "serving_request_finished",
            "Generation requests by finish reason (stop, length, abort, disconnect).",
            ["finish_reason"],
            registry=self.registry,
        )

    def label(self, path: str) -> str:
        return path if path in self.routes else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HTTPMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: HTTPMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = self.metrics.label(scope["path"])
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.labels(path).inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_progress.labels(path).dec()
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.duration.labels(path).observe(time.perf_counter() - start)
