"""Many workers, one study, on a real PostgreSQL server (scripts/start_postgres.sh starts a private cluster).

Two `autotune worker` processes join one study and log to one MLflow tracking server (`mlflow server` on
loopback, its store a fresh database of the same cluster): every configuration is measured once, no trial
is left behind in RUNNING, both workers measure, MLflow holds one parent run with each measured trial
logged once (with its files, uploaded through the server), and the front is computed from both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from autotune.report import results as R
from autotune.study.workers import FINISHED
from serving.launch import free_port, stop_group
from tests.autotune.test_run_e2e import FIXED_LOAD, wait_healthy

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
START = REPO / "scripts" / "start_postgres.sh"
STOP = REPO / "scripts" / "stop_postgres.sh"

TINY = [
    "conf=chat",
    "model=llama-tiny",
    "workload.prefix_len=8",
    "workload.input_len.mean=24",
    "workload.output_len.mean=6",
    "arrival.num_requests=6",
    "arrival.rate=30",
    "arrival.warmup_requests=1",
    *FIXED_LOAD,
    "study.live=off",
    "tracking=none",
]


def _running(url: str) -> bool:
    import psycopg  # SQLAlchemy 2.1's default driver for postgresql:// URLs

    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """The cluster's URL; a cluster this fixture had to start is stopped again afterwards."""
    first = subprocess.run([str(START)], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, f"start_postgres.sh failed:\n{first.stderr}"
    url = first.stdout.strip().splitlines()[-1]
    started_here = "already running" not in first.stderr
    assert _running(url)
    again = subprocess.run([str(START)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == url  # idempotent: same cluster, same URL
    try:
        yield url
    finally:
        if started_here:
            subprocess.run([str(STOP)], capture_output=True, timeout=120, check=True)


@pytest.fixture
def mlflow_server(postgres_url: str, tmp_path: Path) -> Iterator[str]:
    """`mlflow server` in its own process group on a fresh database; its URL. Stopped and dropped after."""
    import psycopg

    database = f"mlflow_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    port = free_port()
    store = postgres_url.rsplit("/", 1)[0] + "/" + database
    log = tmp_path / "mlflow-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--workers", "1",
             "--artifacts-destination", str(tmp_path / "mlflow-artifacts"), "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, timeout_s=180, log=log)
        yield url
    finally:
        stop_group(server, timeout_s=30)  # raises if its uvicorn workers or job runners outlive SIGKILL
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def test_optuna_rdb_storage_creates_and_loads_a_study(postgres_url: str) -> None:
    name = f"rdb-{uuid.uuid4().hex[:8]}"
    storage = optuna.storages.RDBStorage(postgres_url)
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    study.tell(study.ask(), [1.0, 2.0])
    loaded = optuna.load_study(study_name=name, storage=postgres_url)
    assert [t.values for t in loaded.get_trials()] == [[1.0, 2.0]]
    optuna.delete_study(study_name=name, storage=storage)


def _worker(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "autotune.cli", "worker", *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            start_new_session=True,
        )


@pytest.mark.slow
def test_two_workers_share_one_study(postgres_url: str, mlflow_server: str, tmp_path: Path) -> None:
    n_trials = 4
    study_args = [*TINY, f"study.name=pg-{uuid.uuid4().hex[:8]}", f"study.storage={postgres_url}"]
    mlflow_uri = mlflow_server
    tracked = [a for a in study_args if a != "tracking=none"] + [f"tracking.uri={mlflow_uri}"]
    args = [*tracked, f"study.n_trials={n_trials}"]
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
    workers = [_worker(args, tmp_path / f"w{i}", tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        codes = [w.wait(timeout=900) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, 9)
                w.wait()
    logs = "\n".join((tmp_path / f"worker{i}.log").read_text(errors="replace")[-3000:] for i in range(2))
    assert codes == [0, 0], logs

    study = optuna.load_study(study_name=study_args[-2].split("=", 1)[1], storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], "a trial was left RUNNING"
    measured = [t for t in trials if t.user_attrs.get(R.MEASURED)]
    keys = [t.user_attrs[R.CONFIG_KEY] for t in measured]
    assert len(keys) == len(set(keys)), f"a configuration was measured twice: {keys}"
    assert len(measured) == n_trials, logs  # workers count each other's trials; a later ask yields
    owners = {t.user_attrs[R.OWNER] for t in measured}
    assert len(owners) == 2, f"both workers should have measured a trial, owners: {owners}"
    assert any(t.state == TrialState.COMPLETE for t in measured), logs

    client = MlflowClient(mlflow_uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    parents = [
        r for r in runs if r.data.tags.get("autotune.role") == "study" and r.info.lifecycle_stage == "active"
    ]
    assert len(parents) == 1, f"{len(parents)} parent runs"
    logged = sorted(
        int(r.data.tags["autotune.trial"]) for r in runs if r.data.tags.get("autotune.role") == "trial"
    )
    assert logged == sorted(
        {t.number for t in trials if t.state in FINISHED and t.user_attrs.get(R.REPEAT_OF) is None}
    )
    assert parents[0].info.status == "FINISHED"  # closed by the workers at their end
    on_front = [r for r in runs if r.data.tags.get("pareto") == "true"]
    assert on_front, "no trial run tagged pareto=true (the workers tag every worker's runs)"
    for i in range(2):  # each worker wrote the report from both workers' trials
        assert (tmp_path / f"w{i}" / "reports" / study_args[-2].split("=", 1)[1] / "report.html").is_file()
    complete = next(r for r in runs if r.data.tags.get("state") == "COMPLETE")
    files = {a.path for a in client.list_artifacts(complete.info.run_id)}
    assert {"server.log", "summary.json"} <= files, files  # uploaded through the tracking server

    best = tmp_path / "best.yaml"
    export_args = [*study_args, "export.policy=knee", f"export.output={best}"]
    export = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "export", *export_args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert export.returncode == 0, export.stdout + export.stderr
    assert "deployment:" in best.read_text()
