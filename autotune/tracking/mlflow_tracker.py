"""MLflow: a parent run per study (resolved config, trials table, Pareto plots, best.yaml) and a child
run per trial (the flattened deployment as params, every metric, server log and request records).

Writes go through MlflowClient.log_batch, so a trial is one round-trip however many metrics it has.
A resumed study finds its parent run by tag and logs only the trials not logged yet. Workers that start
together on one store may race to create its schema, the experiment and the parent run: each race ends
with every worker using the same one (the oldest parent run wins; a duplicate is deleted).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.config.settings import TrackingSettings
from autotune.report.results import TrialRecord
from autotune.tracking.tracker import Tracker
from autotune.traffic.capacity_result import CAPACITY_FILE, load_steps

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from autotune.trial.runner import TrialOutcome

STUDY_TAG = "autotune.study"
ROLE_TAG = "autotune.role"
TRIAL_TAG = "autotune.trial"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3 opens an experiment of no declared kind on an empty GenAI traces page; this opens its runs."""


def default_tracking_uri() -> str:
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def resolve_uri(settings: TrackingSettings) -> str:
    return settings.uri or default_tracking_uri()


def _artifact_root(uri: str, settings: TrackingSettings) -> str | None:
    if settings.artifact_root:
        return str(Path(settings.artifact_root).resolve())
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts")
    return None


class MlflowTracker(Tracker):
    def __init__(self, settings: TrackingSettings, *, study_name: str, resolved_config: str) -> None:
        for name in ("alembic", "mlflow", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)

        # MLflow prints two "View run" lines per finished run to stdout for a tracking server: noise
        # between the live view's lines (`autotune run` prints the UI command once at the end).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri = resolve_uri(settings)
        self.client: MlflowClient = _client(self.uri)
        self.study_name = study_name
        self.resolved_config = resolved_config
        self.experiment_id = self._experiment(settings)
        self.parent_id = ""
        self.logged: dict[int, str] = {}
        self.running: dict[int, str] = {}
        """Runs opened at a trial's launch, finished in trial_finished."""

    # --- setup -----------------------------------------------------------------------------------

    def _experiment(self, settings: TrackingSettings) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(settings.experiment)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return str(found.experiment_id)
        try:
            return str(
                self.client.create_experiment(
                    settings.experiment,
                    artifact_location=_artifact_root(self.uri, settings),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            )
        except MlflowException:  # another worker created it a moment ago
            found = self.client.get_experiment_by_name(settings.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    def _find_parent(self) -> str | None:
        """The study's parent run: the oldest, when workers starting together each made one."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{self.study_name}' and tags.`{ROLE_TAG}` = 'study'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _logged_trials(self, *, opened: bool = False) -> dict[int, str]:
        """Trial runs of this study in the store (by any worker): finished ones, or with `opened` the ones
        opened at launch and not finished (running elsewhere, or left by an interrupted run)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{self.study_name}' and tags.`{ROLE_TAG}` = 'trial'",
            max_results=5000,
        )
        return {
            int(r.data.tags[TRIAL_TAG]): r.info.run_id
            for r in runs
            if TRIAL_TAG in r.data.tags and (r.data.tags.get("state") == "RUNNING") == opened
        }

    def study_started(self, name: str, total: int, records: Sequence[TrialRecord]) -> None:
        from mlflow.entities import RunStatus

        parent = self._find_parent()
        if parent is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={STUDY_TAG: name, ROLE_TAG: "study"},
            )
            parent = run.info.run_id
            oldest = self._find_parent()
            if oldest is not None and oldest != parent:  # another worker's parent run came first
                self.client.delete_run(parent)
                parent = oldest
        else:
            self.client.update_run(parent, status=RunStatus.to_string(RunStatus.RUNNING))
        self.parent_id = parent
        self._log_text(parent, self.resolved_config, "config.yaml")
        self.logged = self._logged_trials()
        self.running = self._logged_trials(opened=True)
        for record in records:  # trials of an earlier, interrupted run not logged yet
            if record.state in ("COMPLETE", "FAIL", "PRUNED") and record.number not in self.logged:
                self.trial_finished(record, None)

    # --- per trial -------------------------------------------------------------------------------

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        """Open the trial's run at launch, so a running trial is visible (and its start time is true)."""
        if not self.parent_id or number in self.logged or number in self.running:
            return
        tags = {
            PARENT_TAG: self.parent_id,
            STUDY_TAG: self.study_name,
            ROLE_TAG: "trial",
            TRIAL_TAG: str(number),
            "state": "RUNNING",
        }
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number:03d}", tags=tags)
        self.running[number] = run.info.run_id

    def trial_finished(self, record: TrialRecord, outcome: TrialOutcome | None) -> None:
        from mlflow.entities import Metric, Param, RunStatus, RunTag

        if record.number in self.running and record.repeat_of is not None:  # settled as a repeat meanwhile
            self.client.delete_run(self.running.pop(record.number))
        if record.repeat_of is not None or record.number in self.logged or not self.parent_id:
            return
        status = {"COMPLETE": RunStatus.FINISHED, "FAIL": RunStatus.FAILED}.get(
            record.state, RunStatus.KILLED
        )
        tags = {
            PARENT_TAG: self.parent_id,
            STUDY_TAG: self.study_name,
            ROLE_TAG: "trial",
            TRIAL_TAG: str(record.number),
            "state": record.state,
            "feasible": str(record.feasible and record.complete).lower(),
            "pareto": "false",
        }
        if record.reason:
            tags["reason"] = record.reason[:5000]
        if record.devices:
            tags["devices"] = record.devices
        run_id = self.running.pop(record.number, None)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=f"trial-{record.number:03d}", tags=tags)
            run_id = run.info.run_id
        else:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        now = int(time.time() * 1000)
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(record.deployment.items())]
        metrics = [Metric(k, float(v), now, 0) for k, v in sorted(record.metrics.items())]
        for name, value in record.constraints.items():
            metrics.append(Metric(f"constraint.{name}", float(value), now, 0))
        metrics += load_curve_metrics(record, outcome, now)
        for chunk in _chunks(params, 100):
            self.client.log_batch(run_id, params=chunk)
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=chunk)
        self.client.log_batch(run_id, tags=[RunTag("mlflow.note.content", record.label or "base config")])
        for path in _trial_artifacts(record, outcome):
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status=RunStatus.to_string(status))
        self.logged[record.number] = run_id

    # --- end of study ----------------------------------------------------------------------------

    def finalize(
        self,
        records: Sequence[TrialRecord],
        front: Iterable[int],
        artifacts: Iterable[Path],
        interrupted: bool = False,
    ) -> None:
        """Tag the front, log the study's summary metrics and files, close the parent run."""
        from mlflow.entities import Metric, RunStatus

        if not self.parent_id:
            return
        on_front = set(front)
        for number, run_id in {**self._logged_trials(), **self.logged}.items():  # other workers' runs too
            self.client.set_tag(run_id, "pareto", str(number in on_front).lower())
        now = int(time.time() * 1000)
        counts: dict[str, int] = {}
        for r in records:
            if r.repeat_of is None:
                counts[r.state] = counts.get(r.state, 0) + 1
        summary = {f"trials_{k.lower()}": float(v) for k, v in counts.items()}
        summary["pareto_size"] = float(len(on_front))
        self.client.log_batch(self.parent_id, metrics=[Metric(k, v, now, 0) for k, v in summary.items()])
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.parent_id, str(path))
        status = RunStatus.KILLED if interrupted else RunStatus.FINISHED
        self.client.set_terminated(self.parent_id, status=RunStatus.to_string(status))

    def _log_text(self, run_id: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.client.log_artifact(run_id, str(path))


def _client(uri: str, attempts: int = 5) -> MlflowClient:
    """MlflowClient for `uri`, its store opened (which creates or migrates the schema).

    Workers starting together must not migrate one store at once: for a SQLite file a lock file beside
    it serialises them (two alembic runs would leave it half-migrated); a database server's
    transactional DDL rolls the loser back, so there the open is retried.
    """
    from mlflow.tracking import MlflowClient

    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    with _file_lock(Path(path + ".lock") if path else None):
        for attempt in range(attempts):
            try:
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)
                return client
            except Exception as err:
                racing = any(text in str(err) for text in ("already exists", "duplicate", "locked"))
                if not racing or attempt == attempts - 1:
                    raise
                time.sleep(1.0 + attempt)
    raise RuntimeError(f"could not open the MLflow store {uri}")


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _trial_artifacts(record: TrialRecord, outcome: TrialOutcome | None) -> list[Path]:
    directory = Path(outcome.trial_dir) if outcome else (Path(record.trial_dir) if record.trial_dir else None)
    if directory is None or not directory.is_dir():
        return []
    wanted = [directory / name for name in ("server.log", "records.jsonl", "summary.json", CAPACITY_FILE)]
    wanted += sorted(directory.glob("*.yaml"))
    return [path for path in wanted if path.is_file()]


LOAD_CURVE_KEYS = (
    "offered_rps",
    "request_throughput",
    "output_throughput",
    "slo_attainment",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
)
"""Figures of each load step, logged as `load.<key>` with the step's rank by offered rate as the MLflow
step, so the run's charts draw the latency-versus-rate curve."""


def load_curve_metrics(record: TrialRecord, outcome: TrialOutcome | None, now: int) -> list[Any]:
    from mlflow.entities import Metric

    out = []
    for rank, step in enumerate(load_steps(outcome.trial_dir if outcome else record.trial_dir)):
        for key in LOAD_CURVE_KEYS:
            value = step["summary"].get(key)
            if value is not None and math.isfinite(float(value)):
                out.append(Metric(f"load.{key}", float(value), now, rank))
    return out
