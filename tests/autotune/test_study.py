"""The study loop without servers: repeats reuse earlier results, the planner prunes without launching,
orphaned trials of a killed run become retryable, export policies pick as stated."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from autotune.config.compose import build_settings, compose_config
from autotune.config.settings import ExportSettings
from autotune.report import results as R
from autotune.report.export import NoSelection, best_yaml, select
from autotune.report.objectives import Objectives
from autotune.report.pareto import front, knee
from autotune.report.results import TrialRecord, load_records
from autotune.space.parse import parse_space
from autotune.study.context import StudyContext, base_deployment, build_context
from autotune.study.loop import StudyLoop, config_key
from autotune.study.storage import open_study
from serving.config import DeploymentConfig
from tests.autotune.test_run_e2e import FIXED_LOAD

ONE_CONFIG: dict[str, Any] = {
    "base": {"cache.kv_cache_memory_gb": 0.05},
    "dimensions": {"scheduler.policy": {"type": "categorical", "choices": ["continuous"]}},
}


def context(tmp_path: Path, space: dict, *overrides: str) -> StudyContext:
    settings = build_settings(
        compose_config(
            "chat",
            [
                f"study.runs_dir={tmp_path}/runs",
                f"study.reports_dir={tmp_path}/reports",
                "tracking=none",
                "study.name=unit",
                "model=llama-tiny",
                *FIXED_LOAD,
                *overrides,
            ],
        )
    )
    ctx = build_context(settings)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    parsed = parse_space(space, path)
    return dataclasses.replace(ctx, space=parsed, base=base_deployment(parsed, settings.deployment))


METRICS = {"output_throughput": 100.0, "p99_ttft_ms": 50.0, "p99_tpot_ms": 5.0}


def test_the_same_config_is_never_measured_twice(tmp_path: Path) -> None:
    ctx = context(tmp_path, ONE_CONFIG)
    study = open_study(ctx)
    config = ctx.space.deployment(ctx.base, {"scheduler.policy": "continuous"})
    earlier = optuna.trial.create_trial(
        params={"scheduler.policy": "continuous"},
        distributions={"scheduler.policy": optuna.distributions.CategoricalDistribution(["continuous"])},
        values=list(METRICS.values()),
        user_attrs={R.CONFIG_KEY: config_key(config), R.METRICS: METRICS, R.MEASURED: True},
    )
    study.add_trial(earlier)
    loop = StudyLoop(ctx, study)
    assert loop.step() is False  # no server launched
    repeat = study.trials[-1]
    assert repeat.state == TrialState.COMPLETE and repeat.values == list(METRICS.values())
    assert repeat.user_attrs[R.REPEAT_OF] == 0
    assert loop.measured() == 1
    assert [r.number for r in front(load_records(study), ctx.objectives.directions)] == [0]


def test_a_config_that_cannot_fit_is_pruned_without_launching(tmp_path: Path) -> None:
    space = {**ONE_CONFIG, "base": {**ONE_CONFIG["base"], "cache.kv_cache_memory_gb": 8.0}}
    ctx = context(tmp_path, space, "planner.memory_limit_gb=2")
    study = open_study(ctx)
    assert StudyLoop(ctx, study).step() is False
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED
    assert "memory: needs" in trial.user_attrs[R.REASON] and not (ctx.run_dir / "trials").exists()


def test_an_invalid_combination_is_pruned_with_the_schema_message(tmp_path: Path) -> None:
    space = {
        **ONE_CONFIG,
        "dimensions": {
            "scheduler.policy": {"type": "categorical", "choices": ["static"]},
            "scheduler.chunked_prefill": {"type": "categorical", "choices": [True]},
        },
    }
    ctx = context(tmp_path, space)
    study = open_study(ctx)
    assert StudyLoop(ctx, study).step() is False
    assert "chunked_prefill=true needs scheduler.policy=continuous" in study.trials[-1].user_attrs[R.REASON]


def test_an_orphaned_trial_of_a_killed_run_is_retryable_and_queued_again(tmp_path: Path) -> None:
    ctx = context(tmp_path, ONE_CONFIG)
    study = open_study(ctx)
    trial = study.ask()
    trial.suggest_categorical("scheduler.policy", ["continuous"])
    trial.set_user_attr(R.CONFIG_KEY, "k")
    trial.set_user_attr(R.OWNER, f"{socket.gethostname()}:999999999")  # a pid that cannot exist
    loop = StudyLoop(ctx, study)
    loop.workers.fail_orphans()
    frozen = study.trials[0]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs[R.RETRYABLE] is True
    loop.workers.requeue_interrupted()
    loop.workers.requeue_interrupted()  # idempotent
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"scheduler.policy": "continuous"}]
    assert loop.measured() == 0


def test_reopening_with_other_objectives_is_refused(tmp_path: Path) -> None:
    open_study(context(tmp_path, ONE_CONFIG))
    with pytest.raises(ValueError, match=r"another study\.name"):
        open_study(context(tmp_path, ONE_CONFIG, "objectives=goodput"))


# --- export policies -------------------------------------------------------------------------------


def rec(number: int, tput: float, ttft: float, tpot: float, **deployment: object) -> TrialRecord:
    config = DeploymentConfig().replace(**deployment)
    metrics = {"output_throughput": tput, "p99_ttft_ms": ttft, "p99_tpot_ms": tpot}
    objectives = objectives_default()
    return TrialRecord(
        number=number,
        state="COMPLETE",
        params=dict(deployment),
        deployment=config.to_flat(),
        metrics=metrics,
        values=(tput, ttft, tpot),
        constraints=objectives.constraint_values(metrics),
        measured=True,
    )


def objectives_default() -> Objectives:
    return Objectives(
        build_settings(compose_config("chat", ["slo.ttft_ms=500", "slo.tpot_ms=50", *FIXED_LOAD])).objectives
    )


def test_max_throughput_within_slo_skips_trials_that_miss_an_slo() -> None:
    records = [
        rec(0, 50.0, 100.0, 20.0, **{"scheduler.policy": "request"}),
        rec(1, 200.0, 900.0, 20.0, **{"scheduler.policy": "static"}),  # TTFT over 500
        rec(2, 150.0, 200.0, 30.0, **{"scheduler.policy": "continuous"}),
    ]
    objectives = objectives_default()
    chosen = select(records, objectives, ExportSettings())
    assert chosen.record.number == 2 and "p99_ttft_ms <= 500" in chosen.explanation
    data = best_yaml(chosen, objectives, "unit")
    assert DeploymentConfig.from_dict(data["deployment"]).scheduler.policy == "continuous"
    assert data["selected_by"]["trial"] == 2 and data["metrics"]["objectives"]["output_throughput"] == 150.0
    assert data["command"].startswith("serving serve") and "scheduler.policy" not in data["command"]


def test_knee_and_no_feasible_trial() -> None:
    objectives = objectives_default()
    records = [rec(0, 100.0, 10.0, 5.0), rec(1, 300.0, 400.0, 40.0), rec(2, 290.0, 40.0, 6.0)]
    assert select(records, objectives, ExportSettings(policy="knee")).record.number == 2
    assert knee(front(records, objectives.directions), objectives.directions) is not None
    with pytest.raises(NoSelection, match="meets the constraints"):
        select([rec(0, 100.0, 900.0, 5.0)], objectives, ExportSettings())


def test_live_view_reports_progress_best_and_eta() -> None:
    import io

    from rich.console import Console

    from autotune.study.live import LiveView

    out = io.StringIO()
    view = LiveView(objectives_default(), mode="off", console=Console(file=out, width=200))
    first = dataclasses.replace(rec(0, 100.0, 10.0, 5.0), duration_s=30.0)
    view.study_started("unit", 3, [first])
    view.trial_started(1, {"scheduler.policy": "continuous"})
    view.trial_finished(dataclasses.replace(rec(1, 300.0, 20.0, 4.0), duration_s=50.0), None)
    text = out.getvalue()
    assert "1 of 3 configurations already measured" in text and "#1 policy=continuous" in text
    assert "[2/3]" in text and "ETA 0m40s" in text
    assert view.best_lines()[0].startswith("output_throughput: 300 (#1")
    assert view.best_lines()[1].startswith("p99_ttft_ms: 10 (#0")
    panel = Console(file=io.StringIO(), width=120, record=True)
    panel.print(view.render())
    rendered = panel.export_text()
    assert "2/3 measured" in rendered and "best so far" in rendered and "front" in rendered


def test_live_view_shows_a_reason_with_brackets_verbatim() -> None:
    """A reason quotes the server log; rich would take `[/...]` for markup and raise, ending the study."""
    import io

    from rich.console import Console

    from autotune.study.live import LiveView

    reason = "RuntimeError: [enforce fail at alloc_cpu.cpp:127] [/dev/shm] can't allocate memory"
    out = io.StringIO()
    view = LiveView(objectives_default(), mode="off", console=Console(file=out, width=300))
    view.study_started("unit", 2, [])
    view.trial_finished(
        dataclasses.replace(rec(0, 1.0, 1.0, 1.0), state="FAIL", values=None, reason=reason), None
    )
    assert reason in out.getvalue()
    panel = Console(file=io.StringIO(), width=300, record=True)
    panel.print(view.render())
    assert reason in panel.export_text()


def test_live_view_counts_other_workers_trials() -> None:
    """The loop passes every trial of the study before each trial_finished: the count is the study's."""
    import io

    from rich.console import Console

    from autotune.study.live import LiveView

    out = io.StringIO()
    view = LiveView(objectives_default(), mode="off", console=Console(file=out, width=200))
    view.study_started("unit", 4, [])
    view.trials_seen([rec(0, 100.0, 10.0, 5.0), rec(1, 50.0, 1.0, 1.0)])  # another worker's two
    view.trial_finished(rec(2, 10.0, 30.0, 9.0), None)
    assert "[3/4] #2" in out.getvalue()
    assert view.best_lines()[1].startswith("p99_ttft_ms: 1 (#1")


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "gp", "random", "grid"])
def test_every_sampler_walks_a_conditional_space(sampler: str, tmp_path: Path) -> None:
    from autotune.config.settings import StudySettings
    from autotune.study.samplers import make_sampler

    space = parse_space(
        {
            "dimensions": {
                "scheduler.policy": {"type": "categorical", "choices": ["request", "continuous"]},
                "scheduler.max_num_seqs": {
                    "type": "int",
                    "low": 2,
                    "high": 8,
                    "step": 2,
                    "when": {"scheduler.policy": "continuous"},
                },
            }
        },
        tmp_path / "s.yaml",
    )
    study = optuna.create_study(
        directions=["maximize", "minimize"],
        sampler=make_sampler(
            StudySettings(name="s", sampler=sampler, n_startup_trials=2, population_size=2), space
        ),
    )
    seen = set()
    for _ in range(6):
        trial = study.ask()
        params = space.suggest(trial)
        seen.add(tuple(sorted(params.items())))
        trial.set_constraint("slo", -1.0)
        study.tell(trial, [float(params.get("scheduler.max_num_seqs", 1)), 1.0])
    assert seen and all(dict(p).get("scheduler.policy") in ("request", "continuous") for p in seen)


def test_a_silent_trial_of_another_machine_is_retryable_and_a_beating_one_is_not(tmp_path: Path) -> None:
    import time

    ctx = context(tmp_path, ONE_CONFIG, "study.heartbeat_s=0.1")
    study = open_study(ctx)
    silent, beating = study.ask(), study.ask()
    for trial in (silent, beating):
        trial.suggest_categorical("scheduler.policy", ["continuous"])
        trial.set_user_attr(R.OWNER, "another-host:4242")  # not ours to judge by pid
    silent.set_user_attr(R.HEARTBEAT, time.time() - 60)
    beating.set_user_attr(R.HEARTBEAT, time.time() - 60)

    loop = StudyLoop(ctx, study)
    loop.workers._beating.add(beating._trial_id)  # this worker keeps trial 1 alive
    loop.workers.start_heartbeats()
    time.sleep(0.35)
    loop.workers.fail_orphans()
    loop.workers.stop_heartbeats()

    first, second = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs[R.RETRYABLE] is True
    assert "no heartbeat from another-host:4242" in first.user_attrs[R.REASON]
    assert second.state == TrialState.RUNNING and time.time() - second.user_attrs[R.HEARTBEAT] < 1


def test_a_worker_waits_for_other_workers_trials_and_retries_one_that_goes_silent(tmp_path: Path) -> None:
    """The budget is reached only by another machine's running trial: this worker stays, and when that
    trial's heartbeat stops it takes the configuration over (here the planner prunes it: no server)."""
    import time

    space = {**ONE_CONFIG, "base": {**ONE_CONFIG["base"], "cache.kv_cache_memory_gb": 8.0}}
    ctx = context(
        tmp_path,
        space,
        "study.n_trials=1",
        "study.heartbeat_s=0.1",
        "study.max_repeats=2",
        "planner.memory_limit_gb=2",
    )
    study = open_study(ctx)
    foreign = study.ask()
    foreign.suggest_categorical("scheduler.policy", ["continuous"])
    foreign.set_user_attr(R.OWNER, "another-host:4242")
    foreign.set_user_attr(R.DEVICES, "cpus 0-1")
    foreign.set_user_attr(R.HEARTBEAT, time.time() + 1.0)  # alive for ~1.4 s from now

    loop = StudyLoop(ctx, study)
    started = time.monotonic()
    loop.work()
    waited = time.monotonic() - started

    assert waited > 1.0  # it did not leave while the other worker's trial was alive
    first, retry, *repeats = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs[R.RETRYABLE] is True
    assert retry.params == first.params and retry.state == TrialState.PRUNED
    assert "memory: needs" in retry.user_attrs[R.REASON]
    assert len(repeats) == 1 and repeats[0].user_attrs[R.REPEAT_OF] == retry.number


def test_reopening_under_other_traffic_is_refused_naming_the_keys(tmp_path: Path) -> None:
    open_study(context(tmp_path, ONE_CONFIG))
    open_study(context(tmp_path, ONE_CONFIG, "study.n_trials=20", "study.parallel_trials=2"))  # fine
    with pytest.raises(ValueError, match=r"workload\.output_len\.mean=64 there, 128 now") as err:
        open_study(context(tmp_path, ONE_CONFIG, "workload.output_len.mean=128", "slo.ttft_ms=500"))
    assert "slo.ttft_ms=2000 there, 500 now" in str(err.value) and "another study.name" in str(err.value)


def test_a_signal_whose_interrupt_is_swallowed_still_stops_the_study(tmp_path: Path) -> None:
    """Python raises a signal's KeyboardInterrupt wherever the main thread is; inside a weakref callback
    it is printed and dropped. The event the handler sets makes the loop stop anyway (exit 130 path)."""
    import contextlib
    import os
    import signal

    from autotune.commands.session import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt() as stop:
        with contextlib.suppress(KeyboardInterrupt):  # what a callback that swallows it does
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
        assert stop.is_set()
        ctx = context(tmp_path, ONE_CONFIG, "study.n_trials=1")
        study = open_study(ctx)
        with pytest.raises(KeyboardInterrupt):
            StudyLoop(ctx, study, cancel=stop).run()
    assert signal.getsignal(signal.SIGTERM) is before
    assert study.trials == []  # nothing was asked, nothing launched


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_retried(tmp_path: Path) -> None:
    import time

    ctx = context(tmp_path, ONE_CONFIG, "study.heartbeat_s=0.1")
    study = open_study(ctx)
    orphan = study.ask()  # no owner, no heartbeat: its worker died right after asking
    orphan.suggest_categorical("scheduler.policy", ["continuous"])
    loop = StudyLoop(ctx, study)
    assert loop.workers.fail_orphans() == 0 and loop.budget_used() == 1  # it may still be starting: counted
    time.sleep(0.5)  # 4 x heartbeat_s of this worker's own clock
    assert loop.workers.fail_orphans() == 1 and loop.budget_used() == 0
    assert study.trials[0].user_attrs[R.RETRYABLE] is True
    assert "no heartbeat from its worker" in study.trials[0].user_attrs[R.REASON]


def test_of_two_workers_that_read_the_budget_together_the_later_trial_yields(tmp_path: Path) -> None:
    """Both saw one slot left and asked: the trial with the higher number is not launched."""
    import time

    ctx = context(tmp_path, ONE_CONFIG, "study.n_trials=1", "planner.memory_limit_gb=2")
    study = open_study(ctx)
    earlier = study.ask()  # the other worker's trial, asked a moment before ours
    earlier.suggest_categorical("scheduler.policy", ["continuous"])
    earlier.set_user_attr(R.OWNER, "another-host:4242")
    earlier.set_user_attr(R.HEARTBEAT, time.time())
    loop = StudyLoop(ctx, study)
    assert loop.step() is False  # no server launched
    ours = study.trials[-1]
    assert ours.state == TrialState.PRUNED and "budget: study.n_trials=1" in ours.user_attrs[R.REASON]
    assert loop.workers.claims.claim(ours.user_attrs[R.CONFIG_KEY], ours.number) is None  # it claimed nothing
