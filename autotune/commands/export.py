"""`autotune export conf=chat [export.policy=knee] [export.output=best.yaml]`: best.yaml from a study."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
import sqlalchemy.exc

from autotune.commands.session import start
from autotune.config.redact import redact_url
from autotune.report.export import NoSelection, select, write_best
from autotune.report.results import load_records
from autotune.study.remeasure import remeasure_selection
from autotune.study.storage import StorageError, check_sqlite_file, storage_error
from autotune.trial.machine import machine_info

USAGE = """usage: autotune export [conf=NAME] [key=value ...]

Picks one deployment from the finished study study.name (same conf and overrides as the run) and writes
best.yaml: the DeploymentConfig under `deployment:`, why it was chosen, its metrics, the engine command.

  export.policy=max_throughput_within_slo   highest export.throughput_metric meeting every constraint
  export.policy=knee                        front point nearest the ideal (objectives scaled to [0, 1])
  export.output=PATH                        default: reports/<study>/best.yaml
  export.remeasure=N                        fresh launches of the selection before writing (default 3; 0: off)
  export.remeasure_contenders=N             trials tied with it re-measured beside it, interleaved (default 2)

Then: serving launch best.yaml"""


def main(argv: Sequence[str]) -> int:
    session = start(argv, USAGE)
    if isinstance(session, int):
        return session
    ctx = session.ctx
    db = ctx.storage_url.removeprefix("sqlite:///")
    try:
        if db != ctx.storage_url and not Path(db).exists():
            raise KeyError(ctx.name)
        check_sqlite_file(ctx.storage_url)
        study = optuna.load_study(study_name=ctx.name, storage=ctx.storage_url)
    except StorageError as err:
        print(f"autotune export: {err}", file=sys.stderr)
        return 2
    except sqlalchemy.exc.SQLAlchemyError as err:
        print(f"autotune export: {storage_error(ctx.storage_url, err)}", file=sys.stderr)
        return 2
    except KeyError:
        print(
            f"autotune export: no study {ctx.name!r} in {redact_url(ctx.storage_url)}; "
            "run `autotune run` first",
            file=sys.stderr,
        )
        return 2
    records = load_records(study)
    try:
        selection = select(records, ctx.objectives, ctx.settings.export)
    except NoSelection as err:
        print(f"autotune export: {err}", file=sys.stderr)
        return 1
    output = ctx.settings.export.output
    path = Path(output).resolve() if output else ctx.report_dir / "best.yaml"
    again = remeasure_selection(ctx, selection, records)
    remeasured = None
    if again is not None:  # the selection made again on fresh launches of it and its contenders
        selection, remeasured = again
    measured_on = machine_info(ctx.devices, ctx.base.backend)
    write_best(path, selection, ctx.objectives, ctx.name, remeasured=remeasured, measured_on=measured_on)
    record = selection.record
    print(f"trial #{record.number} ({record.label or 'base config'}): {selection.explanation}")
    if remeasured is not None:
        print(remeasured["summary"])
    for name in ctx.objectives.names:
        print(f"  {name} = {record.metrics.get(name, float('nan')):.4g}")
    print(f"wrote {path}\nstart it: serving launch {path}")
    return 0
