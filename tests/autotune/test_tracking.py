"""MLflow tracker against a real sqlite store: pruned and failed trials, resume without duplicates, and
two worker processes opening one fresh store at the same moment."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from autotune.config.settings import TrackingSettings
from autotune.report.results import TrialRecord
from autotune.tracking.mlflow_tracker import MlflowTracker
from serving.config import DeploymentConfig


def record(
    number: int, state: str, reason: str | None = None, values: tuple[float, ...] | None = None
) -> TrialRecord:
    return TrialRecord(
        number=number,
        state=state,
        params={"scheduler.policy": "static"},
        deployment=DeploymentConfig().to_flat(),
        metrics={"output_throughput": values[0]} if values else {},
        values=values,
        reason=reason,
        measured=state != "PRUNED",
    )


def test_states_reasons_and_resume(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = TrackingSettings(uri=uri, experiment="unit")
    tracker = MlflowTracker(settings, study_name="unit", resolved_config="study: {name: unit}\n")
    tracker.study_started("unit", 3, [])
    tracker.trial_finished(record(0, "COMPLETE", values=(10.0,)), None)
    tracker.trial_finished(record(1, "PRUNED", reason="memory: needs 9 GiB"), None)
    tracker.trial_finished(record(2, "FAIL", reason="server exited with code -9"), None)
    tracker.finalize([], front=[0], artifacts=[])

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("unit")
    assert experiment is not None and experiment.artifact_location.endswith("mlartifacts")
    runs = {
        r.data.tags["autotune.trial"]: r
        for r in client.search_runs([experiment.experiment_id])
        if "autotune.trial" in r.data.tags
    }
    assert runs["0"].info.status == "FINISHED" and runs["0"].data.tags["pareto"] == "true"
    assert runs["1"].info.status == "KILLED" and runs["1"].data.tags["reason"].startswith("memory")
    assert runs["2"].info.status == "FAILED" and runs["2"].data.tags["pareto"] == "false"
    assert runs["0"].data.params["scheduler.policy"] == "continuous"  # the deployment, flattened
    assert runs["0"].data.metrics["output_throughput"] == 10.0

    again = MlflowTracker(settings, study_name="unit", resolved_config="")
    again.study_started(
        "unit", 4, [record(0, "COMPLETE", values=(10.0,)), record(3, "COMPLETE", values=(5.0,))]
    )
    trial_runs = [
        r for r in client.search_runs([experiment.experiment_id]) if "autotune.trial" in r.data.tags
    ]
    assert sorted(r.data.tags["autotune.trial"] for r in trial_runs) == ["0", "1", "2", "3"]
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`autotune.role` = 'study'")
    assert len(parents) == 1


RACER = """
import sys, time
from autotune.report.results import TrialRecord
from autotune.config.settings import TrackingSettings
from autotune.tracking.mlflow_tracker import MlflowTracker
from serving.config import DeploymentConfig

uri, start, numbers = sys.argv[1], float(sys.argv[2]), [int(n) for n in sys.argv[3].split(",")]
while time.time() < start:  # both processes open the fresh store at the same moment
    time.sleep(0.001)
tracker = MlflowTracker(TrackingSettings(uri=uri, experiment="race"), study_name="race", resolved_config="")
tracker.study_started("race", 4, [])
for n in numbers:
    record = TrialRecord(
        number=n, state="COMPLETE", params={}, deployment=DeploymentConfig().to_flat(),
        metrics={"output_throughput": float(n)}, values=(float(n),), reason=None, measured=True,
    )
    tracker.trial_finished(record, None)
"""


def test_two_workers_opening_one_fresh_store_at_once_share_one_parent_run(tmp_path: Path) -> None:
    """The race `autotune worker` x 2 on a new SQLite store hit: schema creation, experiment, parent run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.time() + 8  # both interpreters have imported mlflow by then
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, uri, str(start), numbers], stderr=subprocess.PIPE)
        for numbers in ("0,2", "1,3")
    ]
    errors = [r.communicate(timeout=120)[1].decode(errors="replace") for r in racers]
    assert [r.returncode for r in racers] == [0, 0], "\n".join(errors)

    client = MlflowClient(uri)
    experiments = client.search_experiments()
    assert [e.name for e in experiments if e.name == "race"] == ["race"]
    runs = client.search_runs([e.experiment_id for e in experiments])
    parents = [
        r for r in runs if r.data.tags.get("autotune.role") == "study" and r.info.lifecycle_stage == "active"
    ]
    assert len(parents) == 1
    trials = sorted(
        r.data.tags["autotune.trial"] for r in runs if r.data.tags.get("autotune.role") == "trial"
    )
    assert trials == ["0", "1", "2", "3"]
