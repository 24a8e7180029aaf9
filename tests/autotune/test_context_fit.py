"""The workload is checked against model.max_model_len when the run config is composed: an overrun is
refused before anything starts, naming the workload's lengths, the context and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autotune.cli import main as cli_main
from autotune.config.compose import build_settings, compose_config
from autotune.study.context import build_context
from autotune.study.context_fit import length_bound
from autotune.traffic.config import LengthDistribution
from autotune.traffic.workload import sample_lengths
from serving.config import ConfigError


@pytest.mark.parametrize(
    "dist",
    [
        LengthDistribution(dist="constant", mean=40),
        LengthDistribution(dist="uniform", mean=96, range_ratio=0.25),
        LengthDistribution(dist="uniform", mean=7, range_ratio=0.5, max=9),
        LengthDistribution(dist="normal", mean=768, std=400, min=256, max=1536),
        LengthDistribution(dist="lognormal", mean=64, std=1.5, min=16, max=300),
    ],
)
def test_the_bound_is_the_longest_length_the_workload_draws(dist: LengthDistribution) -> None:
    drawn = sample_lengths(dist, 20_000, np.random.default_rng(0))
    assert drawn.max() == length_bound(dist)


def test_an_unbounded_length_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"input_len \(normal\) has no upper bound.*input_len\.max"):
        context("chat", "workload.input_len.dist=normal", "+workload.input_len.std=30")


def context(conf: str, *overrides: str) -> object:
    return build_context(build_settings(compose_config(conf, ["tracking=none", *overrides])))


def test_summarisation_over_a_short_context_is_refused_naming_lengths_context_and_fix() -> None:
    with pytest.raises(ConfigError) as err:
        context("summarise", "deployment.model.max_model_len=1024")
    message = str(err.value)
    for part in (
        "longest request is 1712 tokens",
        "workload.prefix_len 16",
        "workload.input_len up to 1536",
        "workload.output_len up to 160",
        "model.max_model_len=1024",
        "deployment.model.max_model_len=1792",
        "workload.input_len.max=848",
    ):
        assert part in message, message


@pytest.mark.parametrize(
    ("conf", "overrides"),
    [
        ("summarise", []),
        ("chat", []),
        ("chat", ["search=gpu", "workload=chat_gpu", "deployment.model.max_model_len=4096"]),
        ("chat", ["search=gpu", "workload=summarise_gpu", "deployment.model.max_model_len=8192"]),
    ],
)
def test_the_shipped_workloads_fit_the_context_their_conf_gives(conf: str, overrides: list[str]) -> None:
    context(conf, *overrides)


@pytest.mark.parametrize("workload", ["chat_gpu", "summarise_gpu"])
def test_the_gpu_workloads_on_the_shipped_context_are_refused(workload: str) -> None:
    with pytest.raises(ConfigError, match=r"but model\.max_model_len=1024, so the server would refuse"):
        context("chat", f"workload={workload}")


def test_autotune_refuses_the_overrun_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["conf=summarise", "deployment.model.max_model_len=1024", f"study.runs_dir={tmp_path}"]
    assert cli_main(["plan", *args]) == 2
    assert "deployment.model.max_model_len=1792" in capsys.readouterr().err
