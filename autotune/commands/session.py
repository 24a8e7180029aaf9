"""Shared start and end of `run` and `worker`: parse, compose, build the context; after the loop,
write the report and best.yaml and close the tracking run."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf

from autotune.config.compose import Invocation, UsageError, load_run, parse_args
from autotune.config.redact import redact_text, redact_url
from autotune.report.html import ReportFiles, write_report
from autotune.report.results import TrialRecord
from autotune.study.context import StudyContext, build_context
from autotune.study.remeasure import remeasure_selection
from autotune.tracking.tracker import Tracker
from autotune.trial.geometry import ModelGeometry
from autotune.trial.machine import machine_info
from serving.config import ConfigError


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[threading.Event]:
    """SIGTERM (a batch system, `kill`) ends the study like Ctrl-C: the running server is stopped, the
    trial is marked retryable, the report is written.

    Yields the event both signals set. Python raises the KeyboardInterrupt wherever the main thread is,
    and a weakref or __del__ callback swallows it ("Exception ignored in ..."); the study loop watches
    the event too, so such a signal still stops the trial. Only the first signal raises: a second
    Ctrl-C while the servers are being stopped (bounded: SIGKILL after the stop timeout) would abort
    that stop halfway and leave a server running.
    """
    stop = threading.Event()

    def interrupt(signum: int, frame: object) -> None:
        if stop.is_set():
            print("autotune: still stopping the servers; this ends within seconds", file=sys.stderr)
            return
        stop.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Session:
    invocation: Invocation
    cfg: DictConfig
    ctx: StudyContext

    @property
    def resolved_yaml(self) -> str:
        return redact_text(OmegaConf.to_yaml(self.cfg))


def start(argv: Sequence[str], usage: str) -> Session | int:
    """The session, or an exit code (0 after --help/--cfg, 2 on a usage or config error)."""
    try:
        invocation = parse_args(argv)
        if invocation.help:
            print(usage)
            return 0
        cfg, settings = load_run(invocation)
        if invocation.print_config:
            print(redact_text(OmegaConf.to_yaml(cfg)), end="")
            return 0
        ctx = build_context(settings)
    except (UsageError, ConfigError, ValueError) as err:
        print(f"autotune: {redact_text(str(err))}", file=sys.stderr)
        return 2
    return Session(invocation, cfg, ctx)


def _yaml(section: object) -> str:
    """A settings section as one line of YAML (flow style), not a Python repr."""
    plain = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else section
    return yaml.safe_dump(plain, default_flow_style=True, sort_keys=False, width=10_000).strip()


def context_table(ctx: StudyContext) -> dict[str, str]:
    s = ctx.settings
    g: ModelGeometry = ctx.geometry
    return {
        "model": f"{ctx.base.model.path} ({g.num_params / 1e6:.1f}M params, {g.num_layers} layers)",
        "backend": ctx.base.backend,
        "devices": ctx.devices.describe(),
        "machine load": "{:.1f} / {:.1f} / {:.1f} (load average 1/5/15 min, at report time)".format(
            *os.getloadavg()
        ),
        "search space": str(ctx.space.path),
        "not on this machine": "; ".join(ctx.space.narrowed) or "every choice runs here",
        "sampler": f"{s.study.sampler} (seed {s.study.seed})",
        "workload": _yaml(s.workload),
        "arrival": _yaml(s.arrival),
        "slo": _yaml(s.slo),
        "capacity": _yaml(s.capacity) if ctx.traffic.capacity else "off (fixed load only)",
        "storage": redact_url(ctx.storage_url),
    }


def finish(
    session: Session,
    study: optuna.Study,
    records: list[TrialRecord],
    tracker: Tracker | None,
    *,
    remeasure: bool = True,
    interrupted: bool = False,
) -> ReportFiles:
    """Report, best.yaml (the selection re-measured first, unless `remeasure` is off) and the tracking
    parent run's files (ended as killed when the run was `interrupted`)."""
    ctx = session.ctx
    output = ctx.settings.export.output
    best_path = Path(output).resolve() if output else None
    files = write_report(
        study,
        records,
        ctx.objectives,
        ctx.settings.export,
        ctx.report_dir,
        context=context_table(ctx),
        best_path=best_path,
        group_by=next((d.name for d in ctx.space.dimensions if d.kind == "categorical"), "scheduler.policy"),
        remeasure=(lambda selection: remeasure_selection(ctx, selection, records)) if remeasure else None,
        ttft_slo_ms=ctx.traffic.slo.ttft_ms if ctx.traffic.slo else None,
        measured_on=machine_info(ctx.devices, ctx.base.backend),
    )
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    config_path = ctx.run_dir / "config.yaml"
    config_path.write_text(session.resolved_yaml)
    if tracker is not None:
        tracker.finalize(records, files.front, [config_path, *files.all()], interrupted)
    return files
