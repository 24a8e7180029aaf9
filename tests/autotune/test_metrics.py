"""Summary statistics against hand-computed values: vLLM definitions, goodput and SLO attainment at the SLO
boundaries, failed requests as SLO misses."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.traffic.config import SLOConfig
from autotune.traffic.metrics import failures_by_reason, stats_ms, summarize, tpot
from autotune.traffic.records import RequestRecord


def rec(
    ttft: float,
    itl: list[float],
    out: int,
    *,
    start: float = 0.0,
    prompt: int = 10,
    ok: bool = True,
    kind: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=0,
        prompt_len=prompt,
        expected_prompt_len=prompt,
        expected_output_len=out,
        start=start,
        success=ok,
        ttft=ttft if ok else 0.0,
        itl=itl if ok else [],
        latency=(ttft + sum(itl)) if ok else 0.0,
        output_tokens=out if ok else 0,
        error_kind=kind,
    )


def test_definitions_match_vllm() -> None:
    a = rec(0.100, [0.010, 0.030], 3, start=0.0)
    b = rec(0.200, [0.020], 2, start=0.5, prompt=20)
    c = rec(0.050, [], 1, start=1.0)  # one token: no TPOT, no ITL
    failed = rec(0, [], 0, ok=False, kind="timeout")
    s = summarize([a, b, c, failed], duration=2.0)
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["total_input_tokens"] == 40 and s["total_output_tokens"] == 6
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 3.0
    assert s["total_token_throughput"] == 23.0
    assert tpot(a) == pytest.approx(0.020) and tpot(b) == pytest.approx(0.020) and tpot(c) == 0.0
    assert s["mean_tpot_ms"] == pytest.approx(20.0)  # only requests with > 1 token
    itls_ms = np.array([10.0, 30.0, 20.0])  # per chunk, pooled
    assert s["mean_itl_ms"] == pytest.approx(20.0)
    assert s["std_itl_ms"] == pytest.approx(np.sqrt(((itls_ms - 20) ** 2).mean()))  # population std
    assert s["p90_itl_ms"] == pytest.approx(28.0)  # linear: rank 0.9 * 2 = 1.8 -> 20 + 0.8 * (30 - 20)
    assert s["median_ttft_ms"] == pytest.approx(100.0)
    assert s["p99_e2el_ms"] == pytest.approx(140.0 + 0.98 * (220.0 - 140.0))
    assert s["max_concurrent_requests"] == 1  # [0, .14), [.5, .72), [1, 1.05) never overlap
    assert failures_by_reason([a, failed]) == {"timeout": 1}


def test_percentile_keys_and_empty_lists() -> None:
    out = stats_ms("ttft", [])
    assert out == {
        k: 0.0
        for k in (
            "mean_ttft_ms",
            "median_ttft_ms",
            "std_ttft_ms",
            "p50_ttft_ms",
            "p90_ttft_ms",
            "p95_ttft_ms",
            "p99_ttft_ms",
        )
    }
    s = summarize([rec(0, [], 0, ok=False, kind="http_error")], duration=1.0)
    assert s["completed"] == 0 and s["mean_e2el_ms"] == 0.0 and s["request_goodput"] == 0.0


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        (SLOConfig(ttft_ms=125), 2),  # 125 ms exactly meets a 125 ms objective
        (SLOConfig(ttft_ms=124.999), 1),
        (SLOConfig(tpot_ms=31.25), 3),  # TPOT counts as 0 for the one-token request
        (SLOConfig(tpot_ms=31.249), 1),
        (SLOConfig(e2el_ms=187.5), 2),
        (SLOConfig(e2el_ms=187.499), 1),
        (SLOConfig(ttft_ms=125, tpot_ms=31.25, e2el_ms=187.5), 2),
        (SLOConfig(ttft_ms=250, tpot_ms=31.25, e2el_ms=187.499), 1),
        (SLOConfig(), 3),  # no objective: every completed request is good
    ],
)
def test_goodput_at_the_boundaries(slo: SLOConfig, good: int) -> None:
    # times are binary fractions, so "exactly at the objective" is exact in floating point too
    records = [
        rec(0.125, [0.03125, 0.03125], 3),  # ttft 125, tpot 31.25, e2el 187.5
        rec(0.250, [0.03125], 2),  # ttft 250, tpot 31.25, e2el 281.25
        rec(0.0625, [], 1),  # ttft 62.5, tpot 0, e2el 62.5
        rec(0, [], 0, ok=False, kind="timeout"),  # failed requests are never good
    ]
    summary = summarize(records, duration=2.0, slo=slo)
    assert summary["request_goodput"] == good / 2.0
    assert summary["slo_attainment"] == good / 4  # of all four requests: the failed one is a miss


def test_failed_requests_lower_slo_attainment_but_not_goodput() -> None:
    slo = SLOConfig(ttft_ms=200)
    good = [rec(0.1, [0.01], 2, start=i * 0.5) for i in range(4)]
    late = rec(0.3, [0.01], 2, start=2.0)  # completed, misses the TTFT objective
    failed = [rec(0, [], 0, ok=False, kind="stream_dropped") for _ in range(5)]
    clean = summarize([*good, late], duration=4.0, slo=slo)
    hurt = summarize([*good, late, *failed], duration=4.0, slo=slo)
    assert clean["slo_attainment"] == 4 / 5 and hurt["slo_attainment"] == 4 / 10
    assert clean["request_goodput"] == hurt["request_goodput"] == 1.0  # vLLM's: good ones per second
    assert summarize([], duration=1.0, slo=slo)["slo_attainment"] == 0.0
    assert summarize(failed, duration=1.0)["slo_attainment"] == 0.0  # no SLO set: completed / all
