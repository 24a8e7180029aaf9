"""The two ceilings of a decode step on this machine, measured: memory bandwidth (weights and KV are read
once per step) and the GEMM rate of each weight format (the step's FLOPs), both per thread count.

A transformer step is bound by one or the other (the roofline); the warm start's estimate
(autotune/trial/estimate.py) divides the bytes and FLOPs of a deployment by these. Measured, not read
from a spec sheet: the same core count differs by 2x between machines of one cloud type (AVX2 against
AMX), and a busy machine is slower than its spec.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

KINDS = ("float32", "bfloat16", "float16", "int8_dynamic", "int8_weight_only")
"""Weight formats the CPU engine runs: a dtype, or a quantisation (its GEMM in float32 activations)."""


class NoRate(KeyError):
    """A weight format whose GEMM did not run in the measurement: no estimate for its deployments."""


@dataclass(frozen=True)
class MachineRates:
    """Measured ceilings, keyed by thread count (as a string, so the JSON round-trips)."""

    bandwidth_gbs: dict[str, float]
    """Copy bandwidth, GB/s (read + write bytes over time)."""
    gemm_gflops: dict[str, dict[str, float]]
    """Weight format -> threads -> GFLOP/s of a [rows x hidden] x [hidden x intermediate] product."""
    load_avg: float = 0.0
    """The 1-minute load average when measured: a loaded machine measures lower ceilings."""

    def bandwidth(self, threads: int) -> float:
        return _nearest(self.bandwidth_gbs, threads) * 1e9

    def gemm(self, kind: str, threads: int) -> float:
        if kind not in self.gemm_gflops:
            raise NoRate(f"no GEMM rate measured for {kind!r}; measured {sorted(self.gemm_gflops)}")
        return _nearest(self.gemm_gflops[kind], threads) * 1e9

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @staticmethod
    def load(path: Path) -> MachineRates:
        raw = json.loads(path.read_text())
        return MachineRates(raw["bandwidth_gbs"], raw["gemm_gflops"], float(raw.get("load_avg", 0.0)))


def _nearest(table: dict[str, float], threads: int) -> float:
    key = min(table, key=lambda k: abs(int(k) - threads))
    return table[key]


def _best_of(run: Callable[[], object], repeats: int) -> float:
    """The fastest of a few runs: the machine's ceiling, not its noise."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_rates(
    threads: Sequence[int],
    hidden: int = 512,
    intermediate: int = 1536,
    rows: int = 32,
    kinds: Sequence[str] = KINDS,
    repeats: int = 5,
) -> MachineRates:
    """Copy bandwidth over 64 MiB and each format's GEMM at the model's shape; about a second per
    thread count. Formats the machine cannot run are left out (their deployments get no estimate)."""
    import torch

    previous = torch.get_num_threads()
    bandwidth: dict[str, float] = {}
    gemm: dict[str, dict[str, float]] = {}
    try:
        source = torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)
        target = torch.empty_like(source)
        for count in threads:
            torch.set_num_threads(count)
            seconds = _best_of(lambda: target.copy_(source), repeats)
            bandwidth[str(count)] = 2 * source.numel() * 4 / seconds / 1e9
            for kind in kinds:
                product = _gemm(kind, rows, hidden, intermediate)
                if product is None:
                    continue
                seconds = _best_of(product, repeats) / 8
                gemm.setdefault(kind, {})[str(count)] = 2 * rows * hidden * intermediate / seconds / 1e9
    finally:
        torch.set_num_threads(previous)
    return MachineRates(bandwidth, gemm, os.getloadavg()[0])


def _gemm(kind: str, rows: int, hidden: int, intermediate: int) -> Callable[[], None] | None:
    """Eight products of the format's linear layer (timed together), or None when it does not run."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(kind, torch.float32)
    linear = torch.nn.Linear(hidden, intermediate, bias=False).to(dtype)
    x = torch.randn(rows, hidden).to(dtype)
    try:
        if kind == "int8_dynamic":
            linear = torch.ao.quantization.quantize_dynamic(
                torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
            )
        elif kind == "int8_weight_only":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(linear, Int8WeightOnlyConfig())
        module = linear

        def run() -> None:
            with torch.inference_mode():
                for _ in range(8):
                    module(x)

        run()
    except Exception:  # a format without a kernel here: no rate, no estimate
        return None
    return run


def rates_for_study(path: Path, threads: Sequence[int]) -> MachineRates:
    """Measured once per study (cached at `path`), so a resumed study ranks with the same numbers."""
    if path.exists():
        return MachineRates.load(path)
    rates = measure_rates(sorted(set(threads)))
    rates.save(path)
    return rates
