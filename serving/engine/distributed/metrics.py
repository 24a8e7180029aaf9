"""Prometheus view of a parallel replica, read at scrape time (nothing is added to the step path).

  serving_tp_allreduce_info{impl}                                          shm | process_group
  serving_tp_allreduce_seconds_total / serving_tp_allreduce_calls_total   rank 0's time in all-reduces
  serving_tp_steps_total                                                   steps that ran a forward
  serving_tp_step_broadcast_seconds_total                                  rank 0 sending step inputs
  serving_pipeline_stage_busy_seconds_total{stage}                         compute time per stage
  serving_pipeline_stage_busy_fraction{stage}                              busy share, last ~10 s
  serving_pipeline_micro_batches_in_flight                                 now
All-reduce time per step = rate(allreduce_seconds) / rate(steps); a stage's bubble = 1 - busy fraction.
Each engine hands its own numbers to the function for its kind, so nothing here guesses an engine's type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.engine.distributed.busy import BusyMeter


class FamiliesCollector(Collector):
    """A Collector over a function that yields the metric families at scrape time."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families()


def tensor_parallel_families(
    impl: str, allreduce_seconds: float, allreduce_calls: int, steps: int, broadcast_seconds: float
) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "serving_tp_allreduce_info", "All-reduce in use: shm or process_group", labels=["impl"]
    )
    info.add_metric([impl], 1.0)
    yield info
    yield _counter("serving_tp_allreduce_seconds", "Rank 0 time in all-reduce", allreduce_seconds)
    yield _counter("serving_tp_allreduce_calls", "All-reduce calls on rank 0", allreduce_calls)
    yield _counter("serving_tp_steps", "Steps that ran a tensor-parallel forward", steps)
    yield _counter(
        "serving_tp_step_broadcast_seconds",
        "Rank 0 time sending step inputs to the other ranks",
        broadcast_seconds,
    )


def pipeline_families(stages: Sequence[BusyMeter], in_flight: int) -> Iterator[Metric]:
    busy_total = CounterMetricFamily(
        "serving_pipeline_stage_busy_seconds", "Compute seconds per pipeline stage", labels=["stage"]
    )
    busy_fraction = GaugeMetricFamily(
        "serving_pipeline_stage_busy_fraction",
        "Busy share of each pipeline stage over the last ~10 s (1 - bubble)",
        labels=["stage"],
    )
    for stage, meter in enumerate(stages):
        busy_total.add_metric([str(stage)], meter.seconds)
        busy_fraction.add_metric([str(stage)], meter.fraction())
    yield busy_total
    yield busy_fraction
    inflight = GaugeMetricFamily(
        "serving_pipeline_micro_batches_in_flight", "Micro-batches between stages now"
    )
    inflight.add_metric([], in_flight)
    yield inflight


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family
