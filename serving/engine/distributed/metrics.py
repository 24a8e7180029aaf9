"""Prometheus view of a parallel replica, read at scrape time (nothing is added to the step path).

  serving_tp_allreduce_info{impl}                                          shm | process_group
  serving_tp_allreduce_seconds_total / serving_tp_allreduce_calls_total   rank 0's time in all-reduces
  serving_tp_steps_total                                                   steps that ran a forward
  serving_tp_step_broadcast_seconds_total                                  rank 0 sending step inputs
  serving_pipeline_stage_busy_seconds_total{stage}                         compute time per stage
  serving_pipeline_stage_busy_fraction{stage}                              busy share, last ~10 s
  serving_pipeline_micro_batches_in_flight                                 now
All-reduce time per step = rate(allreduce_seconds) / rate(steps); a stage's bubble = 1 - busy fraction.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class ParallelCollector(Collector):
    """Collects from a TensorParallelEngine or a PipelineEngine (duck-typed: see the attributes used)."""

    def __init__(self, engine: Any, labels: dict[str, str]) -> None:
        self.engine = engine
        self.labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        names, values = list(self.labels), list(self.labels.values())
        engine = self.engine
        allreduce = getattr(engine, "allreduce", None)
        if allreduce is not None:
            info = GaugeMetricFamily(
                "serving_tp_allreduce_info",
                "All-reduce in use: shm or process_group",
                labels=[*names, "impl"],
            )
            info.add_metric([*values, engine.allreduce_impl], 1.0)
            yield info
            yield _counter(
                "serving_tp_allreduce_seconds", "Rank 0 time in all-reduce", names, values, allreduce.seconds
            )
            yield _counter(
                "serving_tp_allreduce_calls", "All-reduce calls on rank 0", names, values, allreduce.calls
            )
            yield _counter(
                "serving_tp_steps",
                "Steps that ran a tensor-parallel forward",
                names,
                values,
                engine.num_steps,
            )
            yield _counter(
                "serving_tp_step_broadcast_seconds",
                "Rank 0 time sending step inputs to the other ranks",
                names,
                values,
                engine.broadcaster.seconds,
            )
        if getattr(engine, "inflight", None) is not None:
            busy_total = CounterMetricFamily(
                "serving_pipeline_stage_busy_seconds",
                "Compute seconds per pipeline stage",
                labels=[*names, "stage"],
            )
            busy_fraction = GaugeMetricFamily(
                "serving_pipeline_stage_busy_fraction",
                "Busy share of each pipeline stage over the last ~10 s (1 - bubble)",
                labels=[*names, "stage"],
            )
            for stage, meter in enumerate(engine.group.busy):
                busy_total.add_metric([*values, str(stage)], meter.seconds)
                busy_fraction.add_metric([*values, str(stage)], meter.fraction())
            yield busy_total
            yield busy_fraction
            inflight = GaugeMetricFamily(
                "serving_pipeline_micro_batches_in_flight", "Micro-batches between stages now", labels=names
            )
            inflight.add_metric(values, len(engine.inflight))
            yield inflight


def _counter(name: str, doc: str, names: list[str], values: list[str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=names)
    family.add_metric(values, value)
    return family
