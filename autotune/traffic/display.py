"""Terminal output: a rich progress bar while requests complete and a result table like vLLM's."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autotune.traffic.metrics import LATENCY_METRICS, PERCENTILES


def make_progress(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def summary_table(
    summary: Mapping[str, float | int], failures: Mapping[str, int], title: str = "Serving benchmark"
) -> Table:
    """Counts and throughputs, then mean/median/std/percentiles of each latency metric, in ms."""
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in (
        ("completed", "Successful requests"),
        ("failed", "Failed requests"),
        ("duration", "Benchmark duration (s)"),
        ("total_input_tokens", "Total input tokens"),
        ("total_output_tokens", "Total generated tokens"),
        ("request_throughput", "Request throughput (req/s)"),
        ("request_goodput", "Request goodput (req/s)"),
        ("slo_attainment", "SLO attainment (failed = miss)"),
        ("output_throughput", "Output token throughput (tok/s)"),
        ("total_token_throughput", "Total token throughput (tok/s)"),
        ("max_concurrent_requests", "Peak concurrent requests"),
        ("p99_schedule_lag_ms", "P99 client schedule lag (ms)"),
        ("max_schedule_lag_ms", "Max client schedule lag (ms)"),
    ):
        value = summary.get(key)
        if value is not None:
            table.add_row(label, f"{value:.2f}" if isinstance(value, float) else str(value))
    for kind, count in sorted(failures.items()):
        table.add_row(f"  failed: {kind}", str(count))
    stats = ["mean", "median", "std"] + [f"p{int(p)}" for p in PERCENTILES]
    latency = Table(show_header=True)
    latency.add_column("ms")
    for stat in stats:
        latency.add_column(stat, justify="right")
    for name in LATENCY_METRICS:
        latency.add_row(name.upper(), *(f"{float(summary.get(f'{s}_{name}_ms', 0.0)):.2f}" for s in stats))
    outer = Table.grid()
    outer.add_row(table)
    outer.add_row(latency)
    return outer
