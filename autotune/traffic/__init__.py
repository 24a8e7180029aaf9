"""Synthetic traffic for OpenAI-compatible servers and vLLM bench-serve metrics (`autotune bench`, trials)."""

from autotune.traffic.config import ArrivalConfig, ClientConfig, LengthDistribution, SLOConfig, WorkloadConfig
from autotune.traffic.records import RequestRecord
from autotune.traffic.runner import BenchmarkResult, run_benchmark, run_benchmark_async, run_sweep

__all__ = [
    "ArrivalConfig",
    "BenchmarkResult",
    "ClientConfig",
    "LengthDistribution",
    "RequestRecord",
    "SLOConfig",
    "WorkloadConfig",
    "run_benchmark",
    "run_benchmark_async",
    "run_sweep",
]
