"""One trial: launch the deployment, drive the workload, read server stats, stop everything.

Whatever goes wrong (no /health in time, a crash or OOM kill, a server that hangs, a benchmark that does
not finish, too many failed requests) ends as a failed TrialOutcome with the reason and the server log; it
never raises, so the study goes on with the next configuration (as Optuna's own _run_trial records FAIL
and continues).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

from autotune.config.settings import TrialSettings
from autotune.traffic.capacity import find_capacity
from autotune.traffic.capacity_result import CapacityResult
from autotune.traffic.client import OnChunk
from autotune.traffic.config import ArrivalConfig, CapacityConfig, ClientConfig, SLOConfig, WorkloadConfig
from autotune.traffic.metrics import failures_by_reason
from autotune.traffic.runner import BenchmarkResult, run_benchmark_async
from autotune.traffic.workload import preload_tokenizer
from autotune.trial.watch import Progress, WatchError, signal_hint, watched
from serving.config import DeploymentConfig

if TYPE_CHECKING:
    from autotune.study.front_gate import Gate
    from serving.launch import ServerProcess

MIB = 2**20
T = TypeVar("T")


@dataclass(frozen=True)
class Traffic:
    """What every trial of a study sends (built once from the workload/arrival/slo/client sections)."""

    workload: WorkloadConfig
    arrival: ArrivalConfig
    slo: SLOConfig | None = None
    client: ClientConfig = field(default_factory=ClientConfig)
    capacity: CapacityConfig | None = None
    """The load search each trial runs (None: only the fixed load of `arrival`)."""


@dataclass
class TrialOutcome:
    """The result of one launch: metrics when it completed, the reason when it failed."""

    ok: bool
    metrics: dict[str, float]
    reason: str | None
    trial_dir: Path
    log_path: Path
    records_path: Path | None
    duration_s: float
    log_tail: str = ""
    pruned: str | None = None
    """Why the front gate ended the search early (the metrics are the search's so far), else None."""
    transient: bool = False
    """Failed for a reason outside the deployment (a slow start on a busy machine, ports taken by
    others): worth one more launch, unlike a configuration that fails by itself."""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class TrialCancelled(KeyboardInterrupt):
    """The study was interrupted while this trial ran in a worker thread (which gets no SIGINT itself)."""


def run_trial(
    config: DeploymentConfig,
    traffic: Traffic,
    settings: TrialSettings,
    trial_dir: Path,
    *,
    cpus: Sequence[int] | None = None,
    extra_env: dict[str, str] | None = None,
    on_phase: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    probe: Callable[[str, str, Path], dict[str, float]] | None = None,
    gate: Gate | None = None,
) -> TrialOutcome:
    """Launch on a free port, wait for /health, benchmark (with warm-up), stop the process group.

    Setting `cancel` stops the trial within a fraction of a second: the server is stopped and
    TrialCancelled raised, so the caller records an interruption rather than a failed configuration.
    `probe(url, model, trial_dir)` (the quality guard's) runs after a usable benchmark; its metrics join.
    `gate` (the front gate's) may end the capacity search after its nominal step: the outcome says why.
    """
    from serving.launch import ServerProcess, ServerStartError

    trial_dir.mkdir(parents=True, exist_ok=True)
    log_path = trial_dir / "server.log"
    config = config.replace(**{"server.port": 0})
    phase = on_phase or (lambda _: None)
    started = time.monotonic()
    env = {**settings.env, **(extra_env or {})}
    server = ServerProcess(config, log_path=log_path, cpus=cpus, extra_env=env or None)
    metrics: dict[str, float] = {}
    reason: str | None = None
    pruned: str | None = None
    transient = False
    records_path: Path | None = None
    try:
        phase("starting server")
        server.start()
        preload_tokenizer(traffic.workload, config.model.name)  # meanwhile, not in the watched benchmark
        server.wait_healthy(settings.startup_timeout_s, cancel=cancel)
        metrics["startup_s"] = time.monotonic() - started
        phase("benchmarking")
        if traffic.capacity is None:
            summary, failures = _benchmark(server, config.model.name, traffic, settings, trial_dir, cancel)
            records_path = trial_dir / "records.jsonl"
        else:
            devices = _device_count(cpus, env)
            summary, failures = _capacity(
                server, config, traffic, settings, trial_dir, cancel, phase, devices, gate
            )
            records_path = trial_dir / "steps"
            pruned = summary.pop("stopped_by", None)
        metrics.update({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})
        reason = _judge(summary, failures, server.poll(), settings)
        if probe is not None and reason is None and pruned is None:
            phase("quality probe")
            metrics.update(probe(server.url, config.model.name, trial_dir))
    except WatchError as err:  # died, hung or cancelled while the benchmark ran: the message says which
        reason = str(err)
    except TimeoutError:
        limit = settings.benchmark_timeout_s
        reason = f"no progress: the benchmark did not finish within trial.benchmark_timeout_s={limit:g}"
    except Exception as err:  # a trial must never end the study: record why it failed
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
        transient = isinstance(err, ServerStartError) and err.transient
        if transient and "not healthy" in reason:  # name the setting that bounds it
            head, _, log = reason.partition("; log ")
            reason = f"{head} (trial.startup_timeout_s: raise it on a busy machine); log {log}"
    finally:
        phase("stopping server")
        code, stop_error = _stop(server, settings.stop_timeout_s)
        leftover = stop_error or _leftover_processes(server)
        if leftover and reason is None:
            reason = leftover
    if cancel is not None and cancel.is_set():
        raise TrialCancelled(f"trial in {trial_dir} cancelled")
    peak = int(getattr(server, "peak_rss_bytes", 0) or 0)
    if peak:
        metrics["peak_rss_mb"] = peak / MIB
    if reason is not None and code not in (None, 0) and "exited" not in reason:
        reason += f" (server exit code {code}{signal_hint(code)})"
    ok = reason is None
    if not ok and log_path.exists():
        last = _last_log_line(log_path)
        if last and last not in (reason or ""):
            reason = f"{reason}; server log ends: {last}"
    return TrialOutcome(
        ok=ok,
        metrics=metrics,
        reason=reason,
        trial_dir=trial_dir,
        log_path=log_path,
        records_path=records_path if records_path and records_path.exists() else None,
        duration_s=time.monotonic() - started,
        log_tail="" if ok else log_tail(log_path),
        pruned=pruned if ok else None,
        transient=transient and not ok,
    )


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b(:|$)")
"""The last line of a traceback (`RuntimeError: ... can't allocate memory`)."""


def _last_log_line(path: Path) -> str:
    """What the server log says went wrong: the last exception of a traceback in its tail (the lines after
    it are the orderly shutdown it caused), else its last line that is not a warning from a library."""
    lines = [line.strip() for line in log_tail(path, 40).splitlines() if line.strip()]
    for line in reversed(lines):
        if EXCEPTION_LINE.match(line):
            return line[:300]
    for line in reversed(lines):
        if not line.startswith(("W1", "W0", "Warning", "warnings.warn")):
            return line[:300]
    return ""


def _watched(
    make: Callable[[OnChunk], Awaitable[T]],
    server: ServerProcess,
    settings: TrialSettings,
    cancel: threading.Event | None,
) -> T:
    """Run the benchmark coroutine `make(on_chunk)` under the watch (autotune.trial.watch) and within
    trial.benchmark_timeout_s: a death or a hang of the server fails it at once."""
    progress = Progress()

    async def run() -> T:
        timed = asyncio.wait_for(make(progress.tick), timeout=settings.benchmark_timeout_s)
        result: T = await watched(timed, server, settings.stall_timeout_s, progress, cancel)
        return result

    return asyncio.run(run())


def _benchmark(
    server: ServerProcess,
    model: str,
    traffic: Traffic,
    settings: TrialSettings,
    out_dir: Path,
    cancel: threading.Event | None = None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """The fixed load of the arrival section."""

    def make(on_chunk: OnChunk) -> Awaitable[BenchmarkResult]:
        return run_benchmark_async(
            server.url,
            model,
            traffic.workload,
            traffic.arrival,
            slo=traffic.slo,
            client=traffic.client,
            out_dir=out_dir,
            progress=False,
            on_chunk=on_chunk,
        )

    result = _watched(make, server, settings, cancel)
    return dict(result.summary), dict(result.failures_by_reason)


def _capacity(
    server: ServerProcess,
    config: DeploymentConfig,
    traffic: Traffic,
    settings: TrialSettings,
    out_dir: Path,
    cancel: threading.Event | None,
    phase: Callable[[str], None],
    devices: int,
    gate: Gate | None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """The capacity search; failures counted over every step except requests cut as certain SLO misses."""
    assert traffic.capacity is not None and traffic.slo is not None  # build_traffic checks both
    slo, capacity = traffic.slo, traffic.capacity

    def bounded(partial: CapacityResult) -> str | None:
        """The gate asked with the search's bounds and the memory held so far (it only grows)."""
        if gate is None or not capacity.prune_dominated:
            return None
        memory = (server.peak_rss_bytes / MIB, math.inf)
        return gate({**partial.bounds(devices, capacity.prune_margin), "peak_rss_mb": memory})

    def make(on_chunk: OnChunk) -> Awaitable[CapacityResult]:
        return find_capacity(
            server.url,
            config.model.name,
            traffic.workload,
            traffic.arrival,
            slo,
            client=traffic.client,
            settings=capacity,
            probe_concurrency=config.scheduler.max_num_seqs * config.parallel.dp,
            out_dir=out_dir,
            on_step=lambda step: phase(f"load {step.label}: attainment {step.attainment:.0%}"),
            on_chunk=on_chunk,
            gate=bounded,
        )

    result = _watched(make, server, settings, cancel)
    records = [r for step in result.steps for r in step.records]
    failures = failures_by_reason([r for r in records if r.error_kind not in SLO_MISS_KINDS])
    summary: dict[str, Any] = result.metrics(devices)
    summary["completed"] = sum(r.success for r in records)
    summary["failed"] = sum(failures.values())
    summary["slo_misses"] = sum(r.error_kind in SLO_MISS_KINDS for r in records)
    summary["stopped_by"] = result.stopped_by
    return summary, failures


SLO_MISS_KINDS = ("timeout", "abandoned")
"""Failures the capacity search causes on purpose (requests past their SLO bound): misses, not faults."""


def _device_count(cpus: Sequence[int] | None, env: dict[str, str]) -> int:
    """The devices the deployment holds: its GPUs, else its CPU cores."""
    gpus = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return len(gpus) or len(cpus or ()) or len(os.sched_getaffinity(0))


def _judge(
    summary: dict[str, Any], failures: dict[str, int], returncode: int | None, settings: TrialSettings
) -> str | None:
    """None when the measurement is usable, else why not."""
    if returncode is not None:
        return f"server exited with code {returncode}{signal_hint(returncode)} during the benchmark"
    completed, failed = int(summary.get("completed", 0)), int(summary.get("failed", 0))
    if completed == 0 and not (failed == 0 and summary.get("slo_misses", 0)):
        # every request cut by the capacity search as an SLO miss is a measurement: capacity 0
        return f"no request completed (failures: {failures or 'none recorded'})"
    if failed > settings.max_failed_fraction * (completed + failed):
        return (
            f"{failed} of {completed + failed} requests failed ({failures}), more than "
            f"trial.max_failed_fraction={settings.max_failed_fraction:g}"
        )
    return None


def _stop(server: ServerProcess, timeout_s: float) -> tuple[int | None, str | None]:
    """Stop the group; the second value says what went wrong (e.g. processes that survived SIGKILL)."""
    try:
        return server.stop(timeout_s), None
    except Exception as err:
        return server.returncode, f"stopping the server: {err}"


def _leftover_processes(server: ServerProcess) -> str | None:
    """Any live process still in the server's group after stop() (then killed here, and reported)."""
    pgid = server.pid
    if not pgid:
        return None
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return f"processes {[p.pid for p in alive]} of group {pgid} were still alive; killed" if alive else None
