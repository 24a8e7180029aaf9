"""Search-space files: the shipped ones parse; a wrong file gets an error naming file, key and fix."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
import pytest
import yaml

from autotune.config.paths import SEARCH_SPACES_DIR
from autotune.space.parse import load_space, parse_space
from serving.config import ConfigError, DeploymentConfig

SHIPPED = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_space_parses_and_builds_deployments(name: str) -> None:
    space = load_space(name)
    assert space.dimensions
    for params in itertools.islice(space.enumerate(max_points=2), 50):  # the grid has ~10^5 points
        try:
            config = space.deployment(DeploymentConfig().replace(**dict(space.base)), params)
        except ValueError:
            continue  # an invalid combination is pruned by the study, not a broken file
        for key, value in params.items():
            assert config.to_flat()[key] == value


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: object) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_unknown_section_is_named_with_a_suggestion(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"dimension": {}})
    assert "dimension" in message and "did you mean 'dimensions'" in message


def test_unknown_deployment_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, {"dimensions": {"scheduler.max_num_seq": {"type": "int", "low": 1, "high": 4}}}
    )
    assert "dimensions.scheduler.max_num_seq" in message and "scheduler.max_num_seqs" in message


def test_choice_of_the_wrong_type_is_rejected(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, {"dimensions": {"scheduler.policy": {"type": "categorical", "choices": ["fifo"]}}}
    )
    assert "dimensions.scheduler.policy.choices" in message and "'continuous'" in message


def test_low_above_high(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, {"dimensions": {"scheduler.max_num_seqs": {"type": "int", "low": 8, "high": 2}}}
    )
    assert "low <= high" in message and "low=8" in message


def test_log_scale_needs_positive_low_and_no_step(tmp_path: Path) -> None:
    spec = {"type": "float", "low": 0.0, "high": 5.0, "log": True}
    assert "log scale needs low > 0" in error_of(tmp_path, {"dimensions": {"scheduler.batch_wait_ms": spec}})
    spec = {"type": "int", "low": 1, "high": 8, "log": True, "step": 2}
    assert "cannot be combined" in error_of(tmp_path, {"dimensions": {"scheduler.max_num_seqs": spec}})


def test_float_dimension_on_an_int_field(tmp_path: Path) -> None:
    spec = {"type": "float", "low": 1.0, "high": 8.0}
    assert "use categorical" in error_of(tmp_path, {"dimensions": {"scheduler.max_num_seqs": spec}})


def test_condition_must_refer_to_an_earlier_dimension(tmp_path: Path) -> None:
    data = {
        "dimensions": {
            "scheduler.chunked_prefill": {
                "type": "categorical",
                "choices": [True, False],
                "when": {"scheduler.policy": "continuous"},
            },
            "scheduler.policy": {"type": "categorical", "choices": ["static", "continuous"]},
        }
    }
    assert "declared above" in error_of(tmp_path, data)


def test_unknown_constraint_rule_and_bad_seed(tmp_path: Path) -> None:
    dims = {"parallel.tp": {"type": "categorical", "choices": [1, 2]}}
    message = error_of(tmp_path, {"dimensions": dims, "constraints": ["tp_divides_head"]})
    assert "constraints.tp_divides_head" in message and "tp_divides_heads" in message
    message = error_of(tmp_path, {"dimensions": dims, "seeds": [{"parallel.tp": 3}]})
    assert "seeds[0].parallel.tp" in message


def test_unknown_dimension_option(tmp_path: Path) -> None:
    spec = {"type": "int", "low": 1, "high": 8, "logscale": True}
    message = error_of(tmp_path, {"dimensions": {"scheduler.max_num_seqs": spec}})
    assert "dimensions.scheduler.max_num_seqs.logscale" in message


CONDITIONAL = {
    "dimensions": {
        "scheduler.policy": {"type": "categorical", "choices": ["request", "static", "continuous"]},
        "scheduler.batch_wait_ms": {
            "type": "float",
            "low": 1.0,
            "high": 4.0,
            "step": 1.0,
            "when": {"scheduler.policy": "static"},
        },
        "scheduler.chunked_prefill": {
            "type": "categorical",
            "choices": [False, True],
            "when": {"scheduler.policy": "continuous"},
        },
    }
}


def test_conditional_dimensions_exist_only_under_their_condition(tmp_path: Path) -> None:
    space = parse_space(CONDITIONAL, tmp_path / "c.yaml")
    combos = list(space.enumerate())
    assert len(combos) == 1 + 4 + 2  # request; static x 4 waits; continuous x 2
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        params = space.suggest(trial)
        policy = params["scheduler.policy"]
        assert ("scheduler.batch_wait_ms" in params) == (policy == "static")
        assert ("scheduler.chunked_prefill" in params) == (policy == "continuous")
        study.tell(trial, 0.0)
