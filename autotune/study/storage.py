"""Open a study in its Optuna storage, and refuse one whose results would not be comparable.

A storage that cannot be used (unreachable, corrupt, another application's database, locked) is a
StorageError with one clear message, never a traceback; a file that is not an Optuna study is refused
before Optuna touches it, so it is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc

from autotune.config.redact import redact_text, redact_url
from autotune.study.context import StudyContext
from autotune.study.samplers import make_sampler
from autotune.study.staged import policy_pick
from serving.config import flatten

TRAFFIC_ATTR = "autotune.traffic"
"""Study user attr: the workload, arrival and SLO every trial of the study was measured under."""


OPTUNA_TABLES = frozenset({"studies", "version_info"})
SQLITE_HEADER = b"SQLite format 3\x00"


class StorageError(ValueError):
    """The study storage cannot be used; the message names it (password masked) and the fix."""


def open_study(ctx: StudyContext) -> optuna.Study:
    """Create the study, or load it when the name exists (then the objectives must match)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if ctx.storage_url.startswith("sqlite:///"):
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
    check_sqlite_file(ctx.storage_url)
    try:
        study = optuna.create_study(
            study_name=ctx.name,
            storage=ctx.storage_url,
            directions=[optuna.study.StudyDirection[d.upper()] for d in ctx.objectives.directions],
            sampler=make_sampler(
                ctx.settings.study, ctx.space, pick=policy_pick(ctx.objectives, ctx.settings.export)
            ),
            load_if_exists=True,
        )
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise storage_error(ctx.storage_url, err) from None
    names = study.metric_names
    if names is None:
        study.set_metric_names(ctx.objectives.names)
    elif list(names) != ctx.objectives.names:
        raise ValueError(
            f"study {ctx.name!r} in {redact_url(ctx.storage_url)} optimises {list(names)}, "
            f"not {ctx.objectives.names}: "
            "use another study.name for other objectives"
        )
    _check_traffic(study, ctx)
    return study


def _check_traffic(study: optuna.Study, ctx: StudyContext) -> None:
    """Results are comparable only under one traffic: a run (or worker) with other traffic is refused."""
    s = ctx.settings
    now = json.loads(
        json.dumps(
            flatten(
                {
                    "workload": s.workload,
                    "arrival": s.arrival,
                    "slo": s.slo or {},
                    "capacity": s.capacity or {},
                }
            ),
            default=str,
        )
    )
    stored = study.user_attrs.get(TRAFFIC_ATTR)
    if stored is None:
        study.set_user_attr(TRAFFIC_ATTR, now)
        return
    differ = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if differ:
        shown = "; ".join(f"{k}={stored.get(k)!r} there, {now.get(k)!r} now" for k in differ[:5])
        raise ValueError(
            f"study {ctx.name!r} in {redact_url(ctx.storage_url)} was measured under other traffic "
            f"({shown}): "
            "its results would not be comparable; use the study's overrides, or another study.name"
        )


def check_sqlite_file(url: str) -> None:
    """StorageError for an existing SQLite path that is not an Optuna study database (corrupt, another
    kind of file, another application's tables), read-only: Optuna would fail midway or add its tables."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file() or path.stat().st_size == 0:
        return
    keep = f"{path} is left untouched: move it away, or set study.storage to another file"
    with path.open("rb") as file:
        if file.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise StorageError(f"study storage {path} is not an SQLite database (corrupt?); {keep}")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise storage_error(url, err) from None
    if tables and not tables >= OPTUNA_TABLES:
        shown = ", ".join(sorted(tables)[:5])
        raise StorageError(f"study storage {path} is another application's database (tables {shown}); {keep}")


def storage_error(url: str, err: BaseException) -> StorageError:
    """A clear message for a storage Optuna could not open (what failed, where, what to do)."""
    why = _why(err)
    hint = "is the database server running and the URL right?"
    if "locked" in why:
        hint = "another process holds it locked (it is left untouched): wait, or use another study.storage"
    elif "not a database" in why or "malformed" in why:
        hint = "the file is corrupt: move it away (it is left untouched), or use another study.storage"
    return StorageError(f"cannot open the study storage {redact_url(url)}: {why}; {hint}")


def _why(err: BaseException) -> str:
    """The driver's first line (SQLAlchemy's own text adds the SQL and a link), password masked."""
    orig = getattr(err, "orig", None) or err
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return redact_text(first)
