"""`autotune worker conf=chat study.storage=<shared URL> [key=value ...]`: one more machine measuring
trials of a shared study. Workers share the Optuna storage (so also the repeat check); the report is
written by `autotune run` or `autotune export` afterwards."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autotune.live import LiveView
from autotune.session import sigterm_as_interrupt, start
from autotune.study import StudyLoop, open_study
from autotune.tracking import make_tracker

USAGE = """usage: autotune worker [conf=NAME] study.storage=URL [key=value ...]

Joins the study named study.name in a shared storage (e.g. postgresql://...) and measures trials
until study.n_trials configurations are measured in total across all workers."""


def main(argv: Sequence[str]) -> int:
    session = start(argv, USAGE)
    if isinstance(session, int):
        return session
    ctx = session.ctx
    if ctx.settings.study.storage is None:
        print(
            "autotune worker: set study.storage to a URL all workers reach (e.g. postgresql://...)",
            file=sys.stderr,
        )
        return 2
    study = open_study(ctx)
    tracker = make_tracker(ctx.settings.tracking, study_name=ctx.name, resolved_config=session.resolved_yaml)
    observers = [
        LiveView(
            ctx.objectives, mode=ctx.settings.study.live, parallel_trials=ctx.settings.study.parallel_trials
        ),
        *([tracker] if tracker else []),
    ]
    try:
        with sigterm_as_interrupt() as stop:
            StudyLoop(ctx, study, observers, cancel=stop).run()
    except KeyboardInterrupt:
        print("\nautotune worker: interrupted", file=sys.stderr)
        return 130
    return 0
