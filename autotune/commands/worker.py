"""`autotune worker conf=chat study.storage=<shared URL> [key=value ...]`: one more machine measuring
trials of a shared study. Workers share the Optuna storage (so also the repeat check) and end like
`autotune run`: each writes its report and best.yaml from all workers' trials and tags the front in
MLflow (the last to finish sees every trial, since workers wait for each other's running trials)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autotune.commands.run import run_session
from autotune.commands.session import start

USAGE = """usage: autotune worker [conf=NAME] study.storage=URL [key=value ...]

Joins the study named study.name in a shared storage (e.g. postgresql://...) and measures trials
until study.n_trials configurations are measured in total across all workers; then writes the
report and best.yaml from every worker's trials, and tags the Pareto front in MLflow."""


def main(argv: Sequence[str]) -> int:
    session = start(argv, USAGE)
    if isinstance(session, int):
        return session
    if session.ctx.settings.study.storage is None:
        print(
            "autotune worker: set study.storage to a URL all workers reach (e.g. postgresql://...)",
            file=sys.stderr,
        )
        return 2
    return run_session(session)
