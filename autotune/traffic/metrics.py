"""Summary statistics with vLLM bench-serve definitions and key names (docs/bench.md, Metrics).

TTFT, E2EL and TPOT per completed request, ITL per chunk pooled over requests; mean, median, population std
and percentiles with linear interpolation (numpy's defaults, as vLLM); an empty list counts as 0, as vLLM."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from autotune.traffic.config import SLOConfig
from autotune.traffic.records import RequestRecord

PERCENTILES = (50.0, 90.0, 95.0, 99.0)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def tpot(record: RequestRecord) -> float:
    """(E2EL - TTFT) / (output_tokens - 1); 0 when output_tokens <= 1 (vLLM: only for goodput)."""
    if record.output_tokens <= 1:
        return 0.0
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def stats_ms(
    name: str, values_s: Sequence[float], percentiles: Sequence[float] = PERCENTILES
) -> dict[str, float]:
    """mean/median/std/pNN of seconds, reported in ms as {mean_<name>_ms: ...}."""
    data = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1000.0
    out = {
        f"mean_{name}_ms": float(np.mean(data)),
        f"median_{name}_ms": float(np.median(data)),
        f"std_{name}_ms": float(np.std(data)),
    }
    for p in percentiles:
        word = str(int(p)) if int(p) == p else str(p)
        out[f"p{word}_{name}_ms"] = float(np.percentile(data, p))
    return out


def is_good(record: RequestRecord, slo: dict[str, float]) -> bool:
    """Every SLO given holds (value <= objective; vLLM compares objective_ms / 1000 >= value_s)."""
    values = {"ttft": record.ttft, "tpot": tpot(record), "e2el": record.latency}
    return all(objective / 1000.0 >= values[key] for key, objective in slo.items())


def peak_stats(done: Sequence[RequestRecord]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s (chunks per 1 s bucket) and max_concurrent_requests (sweep line)."""
    if not done:
        return 0.0, 0
    first = min(r.start for r in done)
    last = max(r.start + r.latency for r in done)
    buckets = np.zeros(int(np.ceil(last - first)) + 1)
    for r in done:
        times = r.start + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
        index = (times - first).astype(int)
        np.add.at(buckets, index[(index >= 0) & (index < len(buckets))], 1)
    events = sorted([(r.start, 1) for r in done] + [(r.start + r.latency, -1) for r in done])
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return float(buckets.max()), peak


def summarize(
    records: Sequence[RequestRecord], duration: float, slo: SLOConfig | None = None
) -> dict[str, float | int]:
    """The summary dict (vLLM key names) of one timed run; failed requests are counted and excluded.

    Except from slo_attainment: the share of all timed requests meeting every SLO set, where a failed
    request is a miss. request_goodput stays vLLM's (good requests per second of the run), which a run
    whose failures are quick does not lower: 10 good and 90 failed requests in 10 s score a goodput of
    1 req/s, as 10 good of 10 in 10 s do, but an attainment of 0.1 against 1.0.
    """
    done = [r for r in records if r.success]
    total_in = sum(r.prompt_len or 0 for r in done)
    total_out = sum(r.output_tokens for r in done)
    goals = slo.as_dict() if slo is not None else {}
    good = sum(is_good(r, goals) for r in done)
    peak_tokens, peak_requests = peak_stats(done)
    summary: dict[str, float | int] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "request_goodput": good / duration,
        "slo_attainment": good / len(records) if records else 0.0,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_requests,
    }
    summary |= stats_ms("ttft", [r.ttft for r in done])
    summary |= stats_ms("tpot", [tpot(r) for r in done if r.output_tokens > 1])
    summary |= stats_ms("itl", [gap for r in done for gap in r.itl])
    summary |= stats_ms("e2el", [r.latency for r in done])
    summary |= client_stats(records)
    return summary


def client_stats(records: Sequence[RequestRecord]) -> dict[str, float | int]:
    """How well the client kept its schedule (all requests, failed ones too: the client sent them)."""
    lag = np.asarray([r.dispatch_lag for r in records] or [0.0]) * 1000.0
    queue = np.asarray([r.client_queue_time for r in records] or [0.0]) * 1000.0
    return {
        "mean_schedule_lag_ms": float(np.mean(lag)),
        "p99_schedule_lag_ms": float(np.percentile(lag, 99)),
        "max_schedule_lag_ms": float(np.max(lag)),
        "mean_client_queue_time_ms": float(np.mean(queue)),
        "p99_client_queue_time_ms": float(np.percentile(queue, 99)),
    }


def failures_by_reason(records: Sequence[RequestRecord]) -> dict[str, int]:
    return dict(Counter(r.error_kind or "unknown" for r in records if not r.success))
