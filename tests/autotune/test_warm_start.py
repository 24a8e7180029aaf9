"""The warm start: an analytical estimate ranks the space, the best predicted are measured first."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autotune.config.settings import PlannerSettings, StudySettings
from autotune.space.parse import parse_space
from autotune.study.loop import StudyLoop
from autotune.study.storage import open_study
from autotune.study.warm_start import order, rank, warm_points
from autotune.trial.devices import Devices
from autotune.trial.estimate import Estimate, Shape, estimate
from autotune.trial.geometry import load_geometry
from autotune.trial.rates import MachineRates
from serving.config import ConfigError, DeploymentConfig
from tests.autotune.test_study import ONE_CONFIG, context

RATES = MachineRates(
    bandwidth_gbs={"1": 10.0, "2": 18.0},
    gemm_gflops={
        "float32": {"1": 90.0, "2": 170.0},
        "bfloat16": {"1": 300.0, "2": 560.0},
        "int8_dynamic": {"1": 400.0, "2": 700.0},
    },
)
DEVICES = Devices(cpus=(0, 1), ram_bytes=16 * 2**30)
SHAPE = Shape(prompt_tokens=128, output_tokens=64, nominal_rps=2.0, tpot_slo_s=0.2, ttft_slo_s=2.0)
GEOMETRY = load_geometry(DeploymentConfig().model)


def guess(config: DeploymentConfig) -> Estimate:
    return estimate(config, GEOMETRY, RATES, DEVICES, SHAPE, PlannerSettings())


def test_the_estimate_follows_the_ceilings() -> None:
    fp32 = guess(DeploymentConfig())
    int8 = guess(DeploymentConfig().replace(**{"precision.quantization": "int8_dynamic"}))
    request = guess(DeploymentConfig().replace(**{"scheduler.policy": "request"}))
    small_kv = guess(DeploymentConfig().replace(**{"cache.kv_cache_memory_gb": 0.25}))
    dp2 = guess(DeploymentConfig().replace(**{"parallel.dp": 2}))
    assert int8.capacity_rps > fp32.capacity_rps > request.capacity_rps  # fewer bytes, faster GEMM; batch
    assert small_kv.memory_mb < fp32.memory_mb and small_kv.capacity_rps == fp32.capacity_rps
    assert dp2.capacity_rps_per_device < dp2.capacity_rps and dp2.memory_mb > fp32.memory_mb
    slow = estimate(DeploymentConfig(), GEOMETRY, RATES, DEVICES, Shape(128, 64, 1e6), PlannerSettings())
    assert not slow.carries_nominal and slow.ttft_ms == float("inf")


def test_static_batching_whose_running_batch_outlasts_the_ttft_slo_does_not_carry() -> None:
    static = DeploymentConfig().replace(**{"scheduler.policy": "static", "scheduler.max_num_seqs": 16})
    short = guess(static)
    assert short.carries_nominal  # 64 output tokens: a running batch ends well inside the 2 s TTFT SLO
    documents = Shape(prompt_tokens=784, output_tokens=128, nominal_rps=0.2, tpot_slo_s=0.2, ttft_slo_s=2.0)
    long = estimate(static, GEOMETRY, RATES, DEVICES, documents, PlannerSettings())
    continuous = estimate(static.replace(**{"scheduler.policy": "continuous"}), GEOMETRY, RATES, DEVICES,
                          documents, PlannerSettings())  # fmt: skip
    assert not long.carries_nominal and long.ttft_ms == float("inf")
    assert continuous.carries_nominal  # the same batch limit, but a new request joins the next step


def est(capacity: float, ttft: float, memory: float) -> Estimate:
    return Estimate(capacity, capacity, ttft, memory)


def test_order_puts_carried_first_then_pareto_rank_then_capacity() -> None:
    scored = [
        ({"id": "dominated"}, est(1.0, 200.0, 2000.0)),
        ({"id": "fast"}, est(5.0, 100.0, 2000.0)),
        ({"id": "cannot carry"}, est(9.0, float("inf"), 100.0)),
        ({"id": "lean"}, est(2.0, 100.0, 1000.0)),
    ]
    assert [p["id"] for p, _ in order(scored)] == ["fast", "lean", "dominated", "cannot carry"]


def test_within_a_rank_each_layout_and_precision_takes_a_turn() -> None:
    scored = [
        ({"parallel.dp": 1, "cache.kv_cache_memory_gb": 0.25}, est(5.0, 100.0, 1000.0)),
        ({"parallel.dp": 1, "cache.kv_cache_memory_gb": 1.0}, est(5.0, 90.0, 2000.0)),
        ({"parallel.dp": 2, "cache.kv_cache_memory_gb": 0.25}, est(4.0, 80.0, 3000.0)),
    ]
    ordered = [(p["parallel.dp"], p["cache.kv_cache_memory_gb"]) for p, _ in order(scored)]
    assert ordered == [(1, 0.25), (2, 0.25), (1, 1.0)]


def test_rank_covers_the_modeled_knobs_anchors_the_rest_and_skips_refused(tmp_path: Path) -> None:
    space = parse_space(
        {
            "dimensions": {
                "precision.quantization": {"type": "categorical", "choices": ["none", "int8_dynamic"]},
                "scheduler.policy": {"type": "categorical", "choices": ["request", "continuous"]},
                "scheduler.queue_order": {"type": "categorical", "choices": ["sjf", "fcfs"]},
            }
        },
        tmp_path / "s.yaml",
    )
    refused = {"precision.quantization": "int8_dynamic", "scheduler.policy": "request"}

    def check(config: DeploymentConfig) -> str | None:
        flat = config.to_flat()
        return "refused" if all(flat[k] == v for k, v in refused.items()) else None

    ranked = [p for p, _ in rank(space, DeploymentConfig(), guess, check)]
    assert len(ranked) == 3  # 2 x 2 modeled, one refused; queue order at its anchor only
    assert {p["scheduler.queue_order"] for p in ranked} == {"fcfs"}  # DeploymentConfig's default
    assert ranked[0] == {
        "precision.quantization": "int8_dynamic",
        "scheduler.policy": "continuous",
        "scheduler.queue_order": "fcfs",
    }
    assert ranked[-1]["scheduler.policy"] == "request"


def test_warm_points_skip_what_a_seed_covers() -> None:
    ranked = [{"a": 1, "b": 1}, {"a": 1, "b": 2}, {"a": 2, "b": 1}]
    assert warm_points(ranked, 2, seeds=[{"b": 2}]) == [{"a": 1, "b": 1}, {"a": 2, "b": 1}]
    assert warm_points(ranked, 0, seeds=[]) == []


def test_a_negative_warm_start_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"study\.warm_start=-1"):
        StudySettings(name="s", warm_start=-1)


def test_the_loop_enqueues_the_warm_points_after_the_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = {
        **ONE_CONFIG,
        "dimensions": {"scheduler.policy": {"type": "categorical", "choices": ["request", "continuous"]}},
        "seeds": [{"scheduler.policy": "request"}],
    }
    ctx = context(tmp_path, space, "study.warm_start=1")
    ranked = [({"scheduler.policy": "request"}, None), ({"scheduler.policy": "continuous"}, None)]
    monkeypatch.setattr("autotune.study.loop.study_ranking", lambda _ctx: ranked)
    study = open_study(ctx)
    StudyLoop(ctx, study).enqueue_seeds()
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    queued = [t.system_attrs["fixed_params"] for t in waiting]
    assert queued == [{"scheduler.policy": "request"}, {"scheduler.policy": "continuous"}]


def test_rates_are_measured_once_per_study_and_a_missing_format_has_none(tmp_path: Path) -> None:
    from autotune.trial.rates import NoRate, rates_for_study

    path = tmp_path / "machine_rates.json"
    first = rates_for_study(path, [1])
    assert first.bandwidth(1) > 0 and first.gemm("float32", 1) > 0
    assert rates_for_study(path, [1]) == first  # read back, not measured again
    with pytest.raises(NoRate, match="int4"):
        first.gemm("int4_weight_only", 1)
