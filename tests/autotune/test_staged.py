"""The staged search: layout first, then precision, batch limits and scheduler knobs, each stage with the
earlier ones fixed at the best trial so far and the later ones at their anchors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from autotune.config.compose import build_settings, compose_config
from autotune.report import results as R
from autotune.report.objectives import Objectives
from autotune.space.parse import load_space, parse_space
from autotune.space.search_space import SearchSpace
from autotune.study.staged import StagedSampler, policy_pick, stage_of

SPACE = load_space("chat")
SETTINGS = build_settings(compose_config("chat", ["study.sampler=staged"]))


def measured(space: SearchSpace, params: dict[str, Any], capacity: float) -> optuna.trial.FrozenTrial:
    """A measured trial as the default (capacity) objectives record it."""
    metrics = {
        "capacity_rps_per_device": capacity,
        "p99_ttft_ms": 100.0,
        "peak_rss_mb": 500.0,
        "slo_attainment": 1.0,
    }
    return optuna.trial.create_trial(
        params=params,
        distributions={k: space.dimension(k).distribution() for k in params},
        values=[capacity, 100.0, 500.0],
        user_attrs={R.MEASURED: True, R.METRICS: metrics},
    )


def study_with(*trials: optuna.trial.FrozenTrial, n_trials: int = 8) -> optuna.Study:
    pick = policy_pick(Objectives(SETTINGS.objectives), SETTINGS.export)
    study = optuna.create_study(
        directions=["maximize", "minimize", "minimize"], sampler=StagedSampler(SPACE, n_trials, pick, seed=0)
    )
    for trial in trials:
        study.add_trial(trial)
    return study


def asked(study: optuna.Study, count: int) -> list[dict[str, Any]]:
    samples = []
    for _ in range(count):
        trial = study.ask()
        samples.append(SPACE.suggest(trial))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # pruned: measured count stays
    return samples


def test_the_stages_follow_layout_precision_batch_limits_scheduler() -> None:
    assert [stage_of(d.name) for d in SPACE.dimensions] == [
        *["layout"] * 3,
        *["precision"] * 3,  # dtype, quantization, compiled execution
        "scheduler",  # attention
        "scheduler",  # policy
        "batch limits",  # max_num_seqs
        "scheduler",  # batch_wait_ms
        *["batch limits"] * 2,  # chunked_prefill, max_num_batched_tokens
        "scheduler",  # queue_order
        *["batch limits"] * 3,  # kv budget, block size, prefix caching
    ]


def test_the_first_stage_searches_the_layout_with_everything_else_at_its_anchor() -> None:
    samples = asked(study_with(), 12)
    assert len({(s["parallel.dp"], s["parallel.tp"]) for s in samples}) > 1
    for s in samples:
        assert s["precision.dtype"] == "float32" and s["scheduler.policy"] == "continuous"
        assert s["scheduler.max_num_seqs"] == 32 and s["cache.kv_cache_memory_gb"] == 1.0
        assert s["attention"] == "paged" and s["scheduler.queue_order"] == "fcfs"


def test_the_second_stage_fixes_the_best_layout_and_searches_precision() -> None:
    layout = {"parallel.dp": 1, "parallel.tp": 1, "parallel.pp": 1}
    best = {"parallel.dp": 2, "parallel.tp": 1, "parallel.pp": 1}
    study = study_with(measured(SPACE, layout, 50.0), measured(SPACE, best, 80.0))  # 8 trials: 2 a stage
    samples = asked(study, 12)
    assert all({k: s[k] for k in best} == best for s in samples)
    assert len({(s["precision.dtype"], s.get("precision.quantization")) for s in samples}) > 1
    assert all(s["scheduler.max_num_seqs"] == 32 and s["scheduler.policy"] == "continuous" for s in samples)


def test_a_used_up_stage_hands_over_after_a_few_repeats(tmp_path: Path) -> None:
    space = parse_space(
        {
            "dimensions": {
                "parallel.dp": {"type": "categorical", "choices": [1]},
                "precision.dtype": {"type": "categorical", "choices": ["float32", "bfloat16", "float16"]},
            }
        },
        tmp_path / "s.yaml",
    )
    pick = policy_pick(Objectives(SETTINGS.objectives), SETTINGS.export)
    study = optuna.create_study(
        directions=["maximize", "minimize", "minimize"], sampler=StagedSampler(space, 20, pick, seed=0)
    )
    seen: dict[tuple[Any, ...], int] = {}
    for _ in range(8):  # the layout stage (10 of 20 trials) has one deployment: measured, then repeated
        trial = study.ask()
        key = tuple(sorted(space.suggest(trial).items()))
        if key in seen:
            trial.set_user_attr(R.REPEAT_OF, seen[key])
        else:
            seen[key] = trial.number
            trial.set_user_attr(R.MEASURED, True)
        study.tell(trial, [1.0, 1.0, 1.0])
    assert len({dict(k)["precision.dtype"] for k in seen}) > 1  # the precision stage was reached
