"""A password in the study and tracking URLs is used for the live connections and stored or shown nowhere:
not in the output, the logs, runs/, the report, best.yaml, MLflow's params, tags and artifacts, nor in
either database. A real study on the private PostgreSQL cluster (it trusts 127.0.0.1, so any password is
accepted and the URLs below connect as given)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from tests.autotune.test_postgres_workers import REPO, TINY, postgres_url  # noqa: F401 (the fixture)

pytestmark = pytest.mark.postgres

SECRET = "pw-" + uuid.uuid4().hex[:12]


def with_password(url: str, database: str | None = None) -> str:
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    if database is not None:
        host = host.rsplit("/", 1)[0] + "/" + database
    return f"{scheme}://{user.split(':')[0]}:{SECRET}@{host}"


def columns_holding(url: str, needle: str) -> list[str]:
    """table.column of every text column of the database at `url` with a value containing `needle`."""
    import psycopg

    found = []
    with psycopg.connect(url, autocommit=True) as con:
        columns = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
            "AND data_type IN ('text', 'character varying')"
        ).fetchall()
        for table, column in columns:
            query = f'SELECT count(*) FROM "{table}" WHERE "{column}" LIKE %s'
            if con.execute(query, (f"%{needle}%",)).fetchone()[0]:  # type: ignore[index]
                found.append(f"{table}.{column}")
    return found


@pytest.fixture
def tracking_database(postgres_url: str) -> Iterator[str]:  # noqa: F811
    """A fresh database for an MLflow store; its URL without a password. Dropped afterwards."""
    import psycopg

    database = f"mlflow_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + database
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@pytest.mark.slow
def test_passwords_in_storage_and_tracking_urls_are_stored_nowhere(
    postgres_url: str,  # noqa: F811
    tracking_database: str,
    tmp_path: Path,
) -> None:
    name = f"redact-{uuid.uuid4().hex[:8]}"
    storage, tracking = with_password(postgres_url), with_password(tracking_database)
    common = [a for a in TINY if a != "tracking=none"]
    args = [*common, f"study.name={name}", f"study.storage={storage}", "quality.enabled=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = ""
    for command in (
        ["run", *args, f"tracking.uri={tracking}", "study.n_trials=1"],
        ["export", *args, f"export.output={tmp_path / 'best.yaml'}"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "autotune.cli", *command],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        shown += done.stdout + done.stderr
        assert done.returncode == 0, shown[-3000:]
    assert ":***@" in shown and SECRET not in shown

    study = optuna.load_study(study_name=name, storage=storage)  # the password did reach the server
    assert [t.state.name for t in study.trials if t.state.name != "WAITING"] == ["COMPLETE"]
    stored = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not stored, f"the password is stored in {stored}"
    assert (tmp_path / "best.yaml").is_file() and (tmp_path / f"reports/{name}/report.html").is_file()
    assert list(tmp_path.rglob("server.log")) and list(tmp_path.rglob("config.yaml"))
    assert not columns_holding(postgres_url, SECRET), "the password is in the study's database"
    assert not columns_holding(tracking_database, SECRET), "the password is in the MLflow store"
