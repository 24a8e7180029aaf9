"""Every kind of deployment the serving side refuses is pruned before any process starts, with the
serving validator's own reason, and costs none of study.n_trials."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from optuna.trial import TrialState

from autotune.config.compose import build_settings, compose_config
from autotune.report import results as R
from autotune.space.parse import parse_space
from autotune.study.context import StudyContext, base_deployment, build_context
from autotune.study.loop import StudyLoop
from autotune.study.storage import open_study
from autotune.trial.devices import Devices
from autotune.trial.geometry import load_geometry
from autotune.trial.planner import GIB
from serving.config import SHIPPED_MODELS_DIR

FOUR_CORES = Devices(cpus=(0, 1, 2, 3), ram_bytes=16 * GIB)
"""A machine with room for tp2 x pp2, so the engine's own layout check is what refuses it."""
TINY_TRAFFIC = [
    "workload.prefix_len=8",
    "workload.input_len.mean=24",
    "workload.output_len.mean=4",
    "arrival.num_requests=4",
    "arrival.rate=40",
    "arrival.warmup_requests=0",
]

IMPOSSIBLE: list[tuple[dict[str, Any], str]] = [
    ({"parallel.tp": 2, "parallel.pp": 2}, r"parallel layout: parallel\.tp=2 with parallel\.pp=2"),
    (
        {"parallel.tp": 2, "precision.quantization": "int8_dynamic"},
        r"parallel layout: precision\.quantization='int8_dynamic' with parallel\.tp=2",
    ),
    (
        {"precision.quantization": "int4_weight_only"},
        r"precision: precision\.quantization='int4_weight_only' \(torchao\) has no CPU kernel",
    ),
    (
        {"precision.dtype": "bfloat16", "precision.quantization": "int8_dynamic"},
        r"precision: .*int8_dynamic' needs precision\.dtype='float32'",
    ),
    ({"parallel.dp": 2, "parallel.tp": 2, "parallel.pp": 2}, r"world_size_within_devices: .* = 8 ranks"),
    ({"parallel.tp": 3}, r"tp_divides_heads: parallel\.tp=3 does not divide"),
    ({"scheduler.policy": "request"}, r"backend sglang: .*only batches continuously"),
]
"""(deployment, the reason it is pruned with); the last runs on another backend (OVERRIDES)."""
OVERRIDES = {len(IMPOSSIBLE) - 1: ["deployment.backend=sglang"]}


def context(tmp_path: Path, seeds: list[dict[str, Any]], *overrides: str) -> StudyContext:
    """A study of llama-tiny whose space is exactly the given deployments, measured in that order."""
    settings = build_settings(
        compose_config(
            "chat",
            [
                f"study.runs_dir={tmp_path}/runs",
                f"study.reports_dir={tmp_path}/reports",
                "tracking=none",
                "study.name=prelaunch",
                "model=llama-tiny",
                *TINY_TRAFFIC,
                *overrides,
            ],
        )
    )
    ctx = build_context(settings)
    keys = sorted({key for seed in seeds for key in seed})
    dimensions = {
        key: {"type": "categorical", "choices": sorted({s.get(key, _default(key)) for s in seeds}, key=str)}
        for key in keys
    }
    full = [{key: seed.get(key, _default(key)) for key in keys} for seed in seeds]
    space = {
        "base": {"cache.kv_cache_memory_gb": 0.05, "server.log_level": "warning"},
        "dimensions": dimensions,
        "constraints": ["world_size_within_devices", "tp_divides_heads", "pp_within_layers"],
        "seeds": full,
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    parsed = parse_space(space, path)
    return dataclasses.replace(ctx, space=parsed, base=base_deployment(parsed, settings.deployment))


def _default(key: str) -> Any:
    from serving.config import DeploymentConfig

    return DeploymentConfig().to_flat()[key]


@pytest.mark.parametrize("case", range(len(IMPOSSIBLE)), ids=[str(d) for d, _ in IMPOSSIBLE])
def test_an_impossible_deployment_is_pruned_before_any_process_starts(tmp_path: Path, case: int) -> None:
    deployment, reason = IMPOSSIBLE[case]
    ctx = context(tmp_path, [deployment], *OVERRIDES.get(case, []))
    ctx = dataclasses.replace(ctx, devices=FOUR_CORES)
    study = open_study(ctx)
    loop = StudyLoop(ctx, study)
    loop.enqueue_seeds()
    assert loop.step() is False  # nothing launched
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED
    assert R.MEASURED not in trial.user_attrs
    assert re.search(reason, trial.user_attrs[R.REASON]), trial.user_attrs[R.REASON]
    assert not (ctx.run_dir / "trials").exists()
    assert loop.budget_used() == 0


def test_pipeline_stages_on_a_model_type_the_engine_does_not_split_are_pruned(tmp_path: Path) -> None:
    model = tmp_path / "not-llama"
    model.mkdir()
    shape = json.loads((SHIPPED_MODELS_DIR / "llama-tiny" / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**shape, "model_type": "gpt_neox"}))
    ctx = context(tmp_path, [{"parallel.pp": 2}], f"deployment.model.path={model}")
    ctx = dataclasses.replace(ctx, geometry=load_geometry(ctx.base.model))
    study = open_study(ctx)
    loop = StudyLoop(ctx, study)
    loop.enqueue_seeds()
    assert loop.step() is False
    reason = study.trials[-1].user_attrs[R.REASON]
    assert reason.startswith("parallel layout: parallel.pp=2: pipeline stages support model types")
    assert "'gpt_neox'" in reason and loop.budget_used() == 0


@pytest.mark.slow
def test_pruned_deployments_do_not_count_against_the_budget(tmp_path: Path) -> None:
    """Every impossible kind goes first, then one deployment that runs: with study.n_trials=1 the study
    prunes them all and still measures the one (a real server on loopback)."""
    runnable = {"parallel.tp": 1, "scheduler.policy": "continuous"}
    seeds = [d for i, (d, _) in enumerate(IMPOSSIBLE) if i not in OVERRIDES] + [runnable]
    ctx = context(tmp_path, seeds, "study.n_trials=1", "study.live=off")
    records = StudyLoop(ctx, open_study(ctx)).run()
    states = [r.state for r in records]
    assert states[: len(seeds) - 1] == ["PRUNED"] * (len(seeds) - 1), [r.reason for r in records]
    measured = [r for r in records if r.measured]
    assert len(measured) == 1 and measured[0].state == "COMPLETE", measured
    assert measured[0].deployment["parallel.tp"] == 1
    assert sorted(p.name for p in (ctx.run_dir / "trials").iterdir()) == [f"{measured[0].number:04d}"]
