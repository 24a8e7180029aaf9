"""`autotune run conf=chat [key=value ...] [--cfg]`: search deployments for a workload on this machine."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autotune.commands.session import Session, finish, sigterm_as_interrupt, start
from autotune.config.redact import redact_text, redact_url
from autotune.report import quality as quality_report
from autotune.report.html import ReportFiles
from autotune.report.results import load_records
from autotune.study.live import LiveView
from autotune.study.loop import StudyLoop
from autotune.study.storage import open_study
from autotune.tracking import Tracker, make_tracker

USAGE = """usage: autotune run [conf=NAME] [key=value ...] [--cfg]

Runs the study of conf/NAME.yaml (default: chat): each trial launches a real server with one
deployment config, drives the workload, and records the metrics in the Optuna study and MLflow.
Re-running with the same study.name resumes; finished trials are never measured again.

  conf=chat|summarise       the primary config in conf/
  key=value                 any Hydra override: study.n_trials=4 model=llama-tiny slo.ttft_ms=500
                            study.sampler=tpe search.space=summarise tracking=none ...
  --cfg                     print the composed config and exit

Writes runs/<study>/ (storage, server logs, records), reports/<study>/ (report.html, best.yaml)
and the MLflow store (mlflow.db): open it with `mlflow ui --backend-store-uri sqlite:///mlflow.db`."""


def main(argv: Sequence[str]) -> int:
    session = start(argv, USAGE)
    if isinstance(session, int):
        return session
    return run_session(session)


def run_session(session: Session) -> int:
    ctx = session.ctx
    try:
        study = open_study(ctx)
    except ValueError as err:
        print(f"autotune: {redact_text(str(err))}", file=sys.stderr)
        return 2
    view = LiveView(
        ctx.objectives, mode=ctx.settings.study.live, parallel_trials=ctx.settings.study.parallel_trials
    )
    tracker = make_tracker(ctx.settings.tracking, study_name=ctx.name, resolved_config=session.resolved_yaml)
    observers = [view, *([tracker] if tracker else [])]
    interrupted = False
    try:
        with sigterm_as_interrupt() as stop:
            records = StudyLoop(ctx, study, observers, cancel=stop).run()
    except KeyboardInterrupt:
        interrupted = True
        records = load_records(study)
        print("\nautotune: interrupted; run the same command again to resume", file=sys.stderr)
    files = finish(session, study, records, tracker, remeasure=not interrupted, interrupted=interrupted)
    print_summary(session, files, tracker)
    return 130 if interrupted else 0


def print_summary(session: Session, files: ReportFiles, tracker: Tracker | None) -> None:
    ctx = session.ctx
    print(f"\nstudy {ctx.name}: Pareto front = trials {files.front or 'none yet'}")
    if files.selection and files.best:
        print(f"selected trial #{files.selection.record.number}: {files.selection.explanation}")
        if files.remeasured is not None:
            print(files.remeasured["summary"])
        print(f"best config: {files.best}  (start it: serving launch {files.best})")
    elif files.selection_error:
        print(f"no config exported: {files.selection_error}")
    print(f"report: {files.html}")
    if files.selection and quality_report.probed([files.selection.record]):
        print(quality_report.summary(files.selection.record))
    uri = redact_url(tracker.uri) if tracker is not None else None
    if uri and uri.startswith(("http://", "https://")):
        print(f"MLflow: {uri}")  # a tracking server: its UI is already there
    elif uri:
        print(f"MLflow: mlflow ui --backend-store-uri {uri}")
