"""End to end on llama-tiny: `autotune run` launches real servers, logs to a real MLflow store, resumes
without re-measuring, and the exported best.yaml starts a server that answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from autotune.commands import export as export_command
from autotune.commands import run as run_command
from autotune.config.settings import TrialSettings
from autotune.traffic.config import ArrivalConfig, LengthDistribution, WorkloadConfig
from autotune.trial.runner import Traffic, run_trial
from serving.config import DeploymentConfig
from serving.launch import free_port

FIXED_LOAD = [
    "capacity.enabled=false",
    "objectives=throughput_latency",
    "export.throughput_metric=output_throughput",
    "export.remeasure=0",
]
"""The fixed-load objectives of before: these tests prove resume, tracking and export, not the load search."""

TINY = [
    "model=llama-tiny",
    "workload.prefix_len=8",
    "workload.input_len.mean=24",
    "workload.output_len.mean=6",
    "arrival.num_requests=6",
    "arrival.rate=30",
    "arrival.warmup_requests=1",
    *FIXED_LOAD,
    "study.name=e2e",
    "study.live=off",
]
STILL_RUNNING = ["arrival.num_requests=60", "arrival.rate=5"]
"""A 12 s benchmark, for tests that SIGTERM a run once its servers are ready: TINY's lasts under a second
(the client's tokenizer is loaded while the server starts), so a trial could complete before the signal."""


def trial_runs(client: MlflowClient, experiment_id: str) -> list:
    runs = client.search_runs([experiment_id], filter_string="tags.`autotune.role` = 'trial'")
    return sorted(runs, key=lambda r: int(r.data.tags["autotune.trial"]))


@pytest.mark.slow
def test_run_resume_mlflow_export_and_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_command.main(["conf=chat", *TINY, "study.n_trials=2"]) == 0
    trial_dirs = sorted((tmp_path / "runs/e2e/trials").iterdir())
    assert len(trial_dirs) == 2

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("autotune-e2e")
    assert experiment is not None
    runs = trial_runs(client, experiment.experiment_id)
    assert [r.data.tags["autotune.trial"] for r in runs] == ["0", "1"]
    first = runs[0]
    assert first.info.status == "FINISHED" and first.data.tags["state"] == "COMPLETE"
    assert first.data.params["scheduler.policy"] == "request"  # the first seed of search_spaces/chat.yaml
    assert first.data.params["model.path"] == "llama-tiny"
    assert first.data.metrics["completed"] == 6 and first.data.metrics["output_throughput"] > 0
    assert "p99_ttft_ms" in first.data.metrics and first.data.metrics["peak_rss_mb"] > 0
    artifacts = {a.path for a in client.list_artifacts(first.info.run_id)}
    assert {"server.log", "records.jsonl"} <= artifacts
    # the quality guard probed both trials against the cached float32 reference; dummy weights: synthetic
    assert first.data.metrics["quality_synthetic"] == 1.0
    assert (
        0 <= first.data.metrics["quality_token_agreement"] <= 1 and first.data.metrics["quality_mean_kl"] >= 0
    )
    assert (tmp_path / "runs/e2e/quality/reference.json").is_file()
    assert "synthetic" in (tmp_path / "reports/e2e/report.html").read_text()

    # resume: one more configuration is measured, the first two are not measured again
    assert run_command.main(["conf=chat", *TINY, "study.n_trials=3"]) == 0
    assert len(list((tmp_path / "runs/e2e/trials").iterdir())) == 3
    runs = trial_runs(client, experiment.experiment_id)
    assert [r.data.tags["autotune.trial"] for r in runs] == ["0", "1", "2"]
    assert any(r.data.tags["pareto"] == "true" for r in runs)
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`autotune.role` = 'study'")
    assert len(parents) == 1
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"config.yaml", "trials.csv", "report.html", "pareto.html", "best.yaml"} <= parent_files
    assert any(name.endswith(".png") for name in parent_files)
    assert {r.info.run_id for r in runs} == {
        r.info.run_id
        for r in client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
        )
    }
    report = (tmp_path / "reports/e2e/report.html").read_text()
    assert "Pareto" in report and "Failed and pruned" in report

    # export by the knee policy, then `serving launch` it and send a request
    best = tmp_path / "best.yaml"
    assert export_command.main(["conf=chat", *TINY, "export.policy=knee", f"export.output={best}"]) == 0
    config = DeploymentConfig.from_yaml(best)
    assert config.model.path == "llama-tiny"
    port = free_port()
    log = (tmp_path / "launch.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "launch", str(best), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": config.model.name, "prompt": "hello", "max_tokens": 4, "ignore_eos": True},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120, log: Path | None = None
) -> None:
    """Until GET url/health answers 200; the assertion shows the end of `log` when given."""

    def tail() -> str:
        return f":\n{log.read_text(errors='replace')[-3000:]}" if log else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[:3]} exited{tail()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{proc.args[:3]} did not become healthy at {url}{tail()}")


def test_a_server_that_cannot_start_fails_the_trial_with_its_reason(tmp_path: Path) -> None:
    config = DeploymentConfig().replace(**{"model.path": str(tmp_path / "no-such-model")})
    traffic = Traffic(
        WorkloadConfig(output_len=LengthDistribution(mean=4)), ArrivalConfig(rate=10, num_requests=2)
    )
    outcome = run_trial(config, traffic, TrialSettings(startup_timeout_s=60), tmp_path / "trial")
    assert not outcome.ok and outcome.reason
    assert "ServerStartError" in outcome.reason or "exit" in outcome.reason
    assert outcome.log_path.exists()


def sigterm_when_ready(args: list[str], cwd: Path, logs: list[str]) -> tuple[int, str, list[int]]:
    """Start `autotune run args`, SIGTERM it once every server log (relative to cwd) says ready.

    Returns its exit code, its output and the pids of its servers still alive afterwards.
    """
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune.cli", "run", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    paths = [cwd / log for log in logs]
    deadline = time.monotonic() + 240
    while not all(p.exists() and "ready" in p.read_text(errors="replace") for p in paths):
        assert proc.poll() is None and time.monotonic() < deadline, f"servers never got ready: {logs}"
        time.sleep(0.3)
    servers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode(errors="replace")
    alive = [
        p for p in servers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    return proc.returncode, output, alive


CAPACITY_FIDELITY = [
    "capacity.step_s=1.5",
    "capacity.min_requests=6",
    "capacity.max_steps=3",
    "capacity.probe_concurrency=4",
    "arrival.rate=2",
    "slo.ttft_ms=4000",
    "slo.tpot_ms=1000",
]
"""Short load steps: the search's logic end to end in seconds, not its precision."""


@pytest.mark.slow
def test_capacity_study_records_steps_remeasures_the_winner_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "seeds:\n  - {scheduler.policy: continuous}\n"
        "dimensions:\n  scheduler.policy: {type: categorical, choices: [request, continuous]}\n"
    )
    tiny = [a for a in TINY if a not in FIXED_LOAD and not a.startswith(("arrival.", "study.name"))]
    args = [
        "conf=chat",
        *tiny,
        *CAPACITY_FIDELITY,
        "study.name=cap",
        "study.n_trials=1",
        "export.remeasure=1",
        f"search.space={space}",
    ]
    monkeypatch.chdir(tmp_path)
    assert run_command.main(args) == 0
    trial = tmp_path / "runs/cap/trials/0000"
    saved = json.loads((trial / "capacity.json").read_text())
    kinds = [s["kind"] for s in saved["steps"]]
    assert kinds[:2] == ["probe", "nominal"] and len(kinds) >= 3
    assert sorted(p.name for p in (trial / "steps").iterdir())[0].startswith("01_probe")

    best = yaml.safe_load((tmp_path / "reports/cap/best.yaml").read_text())
    remeasured = best["remeasured"]
    assert remeasured["metric"] == "capacity_rps_per_device"
    assert len(remeasured["repeats"]) + len(remeasured["failures"]) == 1
    assert remeasured["trial_value"] == best["metrics"]["all"]["capacity_rps_per_device"]
    assert "capacity_rps_per_device" in best["metrics"]["objectives"]
    assert (tmp_path / "runs/cap/remeasure" / f"{best['selected_by']['trial']:04d}.json").exists()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("autotune-cap")
    assert experiment is not None and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = trial_runs(client, experiment.experiment_id)
    assert len(runs) == 1, "the run opened at launch is the one finished, not a second"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
    curve = client.get_metric_history(run.info.run_id, "load.offered_rps")
    assert len(curve) == len(kinds) - 1 and [m.step for m in curve] == list(range(len(curve)))
    assert [m.value for m in curve] == sorted(m.value for m in curve)
    assert "capacity_rps" in run.data.metrics and "p99_ttft_ms_ci95_high" in run.data.metrics
    assert "capacity.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_a_summarisation_study_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """conf=summarise as shipped (its documents, its 2048-token context, its space) at short fidelity:
    a few requests per trial on llama-tiny; every trial completes, the report and best.yaml are written
    and no server is left running."""
    import psutil

    monkeypatch.chdir(tmp_path)
    args = [
        "conf=summarise",
        *FIXED_LOAD,
        "model=llama-tiny",
        "workload.output_len.mean=8",
        "arrival.num_requests=4",
        "arrival.rate=20",
        "arrival.warmup_requests=0",
        "study.n_trials=2",
        "study.live=off",
        "tracking=none",
    ]
    assert run_command.main(args) == 0
    import optuna

    study = optuna.load_study(study_name="summarise", storage=f"sqlite:///{tmp_path}/runs/summarise/study.db")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2, [(t.state.name, t.user_attrs.get("reason")) for t in study.trials]
    assert {t.user_attrs["deployment"]["model.max_model_len"] for t in done} == {2048}
    prompts = [
        t.user_attrs["metrics"]["total_input_tokens"] / t.user_attrs["metrics"]["completed"] for t in done
    ]
    assert all(p > 600 for p in prompts), prompts  # documents, not chat turns
    best = DeploymentConfig.from_yaml(tmp_path / "reports/summarise/best.yaml")
    assert best.model.max_model_len == 2048
    assert (tmp_path / "reports/summarise/report.html").is_file()
    assert not psutil.Process().children(recursive=True)
