"""Prometheus objects of one engine, on its own registry (the server exposes it at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.engine.outputs import EngineStats

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Step durations in seconds: a CPU decode step is a few to tens of ms, a long prefill up to seconds."""


class EngineMetrics:
    """Gauges of queues and cache, counters of tokens and preemptions, a histogram of step durations."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.num_waiting = Gauge("serving_num_requests_waiting", "Requests waiting to run", registry=r)
        self.num_running = Gauge("serving_num_requests_running", "Requests holding KV blocks", registry=r)
        self.blocks_used = Gauge("serving_kv_cache_blocks_used", "KV-cache blocks in use", registry=r)
        self.blocks_total = Gauge("serving_kv_cache_blocks_total", "KV-cache blocks in the cache", registry=r)
        self.prompt_tokens = Counter("serving_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("serving_generation_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter("serving_num_preemptions", "Sequences preempted (recomputed)", registry=r)
        self.step_duration = Histogram(
            "serving_step_duration_seconds",
            "One engine step: forward + sampling",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self._seen_prompt = self._seen_generation = self._seen_preemptions = 0

    def observe(
        self,
        stats: EngineStats,
        prompt_tokens_total: int,
        generation_tokens_total: int,
        step_seconds: float | None,
    ) -> None:
        """Bring the metrics up to the engine's totals after a step (counters grow by the difference)."""
        self.num_waiting.set(stats.num_waiting)
        self.num_running.set(stats.num_running)
        self.blocks_used.set(stats.kv_blocks_used)
        self.blocks_total.set(stats.kv_blocks_total)
        self.prompt_tokens.inc(prompt_tokens_total - self._seen_prompt)
        self.generation_tokens.inc(generation_tokens_total - self._seen_generation)
        self.preemptions.inc(stats.num_preemptions - self._seen_preemptions)
        self._seen_prompt = prompt_tokens_total
        self._seen_generation = generation_tokens_total
        self._seen_preemptions = stats.num_preemptions
        if step_seconds is not None:
            self.step_duration.observe(step_seconds)
