"""A corrupt, foreign or locked study database: one clear message, exit code 2, the file untouched."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import optuna
import pytest

from autotune.cli import main as cli_main


def _run(tmp_path: Path) -> int:
    return cli_main(["run", "conf=chat", "tracking=none", "study.n_trials=1", f"study.runs_dir={tmp_path}"])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _study_db(tmp_path: Path) -> Path:
    path = tmp_path / "chat" / "study.db"
    path.parent.mkdir(parents=True)
    return path


def test_corrupt_database_is_refused_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _study_db(tmp_path)
    db.write_bytes(b"not a database\n" * 500)
    before = _digest(db)
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err
    assert "is not an SQLite database" in err and "left untouched" in err and "Traceback" not in err
    assert _digest(db) == before
    truncated = db.with_name("cut.db")  # an SQLite header, then garbage
    truncated.write_bytes(b"SQLite format 3\x00" + b"\xff" * 3000)
    assert cli_main(["export", "conf=chat", f"study.storage=sqlite:///{truncated}"]) == 2
    assert "cannot open the study storage" in capsys.readouterr().err


def test_another_applications_database_is_refused_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _study_db(tmp_path)
    with sqlite3.connect(db) as con:  # e.g. an MLflow store given as study.storage by mistake
        con.execute("CREATE TABLE experiments (id INTEGER PRIMARY KEY, name TEXT)")
        con.execute("CREATE TABLE alembic_version (version_num TEXT)")
    con.close()
    before = _digest(db)
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err
    assert "another application's database" in err and "alembic_version, experiments" in err
    assert _digest(db) == before


def test_locked_database_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _study_db(tmp_path)
    optuna.create_study(study_name="other", storage=f"sqlite:///{db}")
    before = _digest(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        assert _run(tmp_path) == 2
        took = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = capsys.readouterr().err
    assert "locked" in err and "another process holds it" in err and "Traceback" not in err
    assert took < 30
    assert _digest(db) == before
