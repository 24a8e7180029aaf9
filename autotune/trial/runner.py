"""One trial: launch the deployment, drive the workload, read server stats, stop everything.

Whatever goes wrong (no /health in time, a crash or OOM kill, a benchmark that makes no progress, too many
failed requests) ends as a failed TrialOutcome with the reason and the server log; it never raises, so the
study goes on with the next configuration (as Optuna's own _run_trial records FAIL and continues).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from autotune.config.settings import TrialSettings
from autotune.traffic.config import ArrivalConfig, ClientConfig, SLOConfig, WorkloadConfig
from autotune.traffic.runner import run_benchmark_async
from serving.config import DeploymentConfig

if TYPE_CHECKING:
    from serving.launch import ServerProcess

MIB = 2**20
CANCEL_POLL_S = 0.2


@dataclass(frozen=True)
class Traffic:
    """What every trial of a study sends (built once from the workload/arrival/slo/client sections)."""

    workload: WorkloadConfig
    arrival: ArrivalConfig
    slo: SLOConfig | None = None
    client: ClientConfig = field(default_factory=ClientConfig)


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
) -> TrialOutcome:
    """Launch on a free port, wait for /health, benchmark (with warm-up), stop the process group.

    Setting `cancel` stops the trial within a fraction of a second: the server is stopped and
    TrialCancelled raised, so the caller records an interruption rather than a failed configuration.
    `probe(url, model, trial_dir)` (the quality guard's) runs after a usable benchmark; its metrics join.
    """
    from serving.launch import ServerProcess

    trial_dir.mkdir(parents=True, exist_ok=True)
    log_path = trial_dir / "server.log"
    config = config.replace(**{"server.port": 0})
    phase = on_phase or (lambda _: None)
    started = time.monotonic()
    env = {**settings.env, **(extra_env or {})}
    server = ServerProcess(config, log_path=log_path, cpus=cpus, extra_env=env or None)
    metrics: dict[str, float] = {}
    reason: str | None = None
    records_path: Path | None = None
    try:
        phase("starting server")
        server.start()
        server.wait_healthy(settings.startup_timeout_s, cancel=cancel)
        metrics["startup_s"] = time.monotonic() - started
        phase("benchmarking")
        summary, failures = _benchmark(server.url, config.model.name, traffic, settings, trial_dir, cancel)
        records_path = trial_dir / "records.jsonl"
        metrics.update({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})
        reason = _judge(summary, failures, server.returncode, settings)
        if probe is not None and reason is None:
            phase("quality probe")
            metrics.update(probe(server.url, config.model.name, trial_dir))
    except TimeoutError:
        limit = settings.benchmark_timeout_s
        reason = f"no progress: the benchmark did not finish within trial.benchmark_timeout_s={limit:g}"
    except Exception as err:  # a trial must never end the study: record why it failed
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
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
        reason += f" (server exit code {code}{_signal_hint(code)})"
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
    )


def _last_log_line(path: Path) -> str:
    """The last line of the server log that is not a warning from a library: usually the error."""
    lines = [line.strip() for line in log_tail(path, 40).splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("W1", "W0", "Warning", "warnings.warn")):
            return line[:300]
    return ""


def _benchmark(
    url: str,
    model: str,
    traffic: Traffic,
    settings: TrialSettings,
    out_dir: Path,
    cancel: threading.Event | None = None,
) -> tuple[dict[str, Any], dict[str, int]]:
    async def timed() -> Any:
        coroutine = run_benchmark_async(
            url,
            model,
            traffic.workload,
            traffic.arrival,
            slo=traffic.slo,
            client=traffic.client,
            out_dir=out_dir,
            progress=False,
        )
        task = asyncio.ensure_future(asyncio.wait_for(coroutine, timeout=settings.benchmark_timeout_s))
        while not task.done():
            await asyncio.wait({task}, timeout=CANCEL_POLL_S)
            if cancel is not None and cancel.is_set() and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise RuntimeError("benchmark cancelled")
        return task.result()

    result = asyncio.run(timed())
    return dict(result.summary), dict(result.failures_by_reason)


def _judge(
    summary: dict[str, Any], failures: dict[str, int], returncode: int | None, settings: TrialSettings
) -> str | None:
    """None when the measurement is usable, else why not."""
    if returncode is not None:
        return f"server exited with code {returncode}{_signal_hint(returncode)} during the benchmark"
    completed, failed = int(summary.get("completed", 0)), int(summary.get("failed", 0))
    if completed == 0:
        return f"no request completed (failures: {failures or 'none recorded'})"
    if failed > settings.max_failed_fraction * (completed + failed):
        return (
            f"{failed} of {completed + failed} requests failed ({failures}), more than "
            f"trial.max_failed_fraction={settings.max_failed_fraction:g}"
        )
    return None


def _signal_hint(code: int) -> str:
    if code in (-signal.SIGKILL, 128 + signal.SIGKILL, 137):
        return ": killed, likely out of memory"
    if code < 0:
        return f": {signal.Signals(-code).name}" if -code in signal.Signals._value2member_map_ else ""
    return ""


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
