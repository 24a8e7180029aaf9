"""Hydra composition: every primary config and every option of the tuner's groups composes and validates
(as lightning-hydra-template smoke-tests each config); errors name the key."""

from __future__ import annotations

import pytest

from autotune.commands import run as run_command
from autotune.config.compose import UsageError, build_settings, compose_config, parse_args
from autotune.config.paths import CONF_DIR
from autotune.study.context import build_context

GROUPS = ("model", "backend", "search", "objectives", "capacity", "study", "tracking", "quality")


@pytest.mark.parametrize("conf", ["chat", "summarise"])
def test_primary_configs_compose_into_a_context(conf: str) -> None:
    settings = build_settings(compose_config(conf))
    assert settings.study.name == conf
    ctx = build_context(settings)
    assert ctx.objectives.names == ["capacity_rps_per_device", "p99_ttft_ms", "peak_rss_mb"]
    assert ctx.traffic.capacity is not None and ctx.traffic.slo is not None
    assert ctx.storage_url.endswith(f"runs/{conf}/study.db")
    # the traffic sections were built with the traffic configs' own validation
    assert ctx.traffic.workload is not None


OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes(group: str, option: str) -> None:
    settings = build_settings(compose_config("chat", [f"{group}={option}"]))
    assert settings.study.name == "chat"
    if group in ("model", "objectives", "search"):
        build_context(settings)


def test_summarise_differs_from_chat_only_where_it_says() -> None:
    chat, summarise = compose_config("chat"), compose_config("summarise")
    assert summarise.workload.name == "summarise" and summarise.search.space == "summarise"
    assert summarise.objectives == chat.objectives and summarise.planner == chat.planner


def test_the_vllm_backend_brings_its_own_space_unless_one_is_named() -> None:
    assert compose_config("chat", ["backend=vllm"]).search.space == "vllm"
    assert compose_config("chat", ["backend=vllm", "search=chat"]).search.space == "chat"
    assert compose_config("summarise", ["backend=vllm"]).search.space == "vllm"
    assert compose_config("summarise", ["backend=vllm", "search=summarise"]).search.space == "summarise"
    assert compose_config("chat", []).search.space == "chat"
    ctx = build_context(build_settings(compose_config("chat", ["backend=vllm"])))
    assert ctx.base.backend == "vllm" and ctx.base.cache.block_size % 32 == 0


@pytest.mark.parametrize("conf", ["chat", "summarise"])
def test_backend_sglang_composes_with_its_own_space(conf: str) -> None:
    """As docs/gpu.md documents it: backend=sglang launches SGLang, searching only knobs SGLang has."""
    assert compose_config(conf, ["backend=sglang", "search=chat"]).search.space == "chat"
    settings = build_settings(compose_config(conf, ["backend=sglang"]))
    assert settings.search.space == "sglang" and settings.trial.startup_timeout_s == 300
    ctx = build_context(settings)
    assert ctx.base.backend == "sglang" and ctx.base.scheduler.policy == "continuous"
    refused = []
    for params in ctx.space.enumerate(4):
        reason, _ = ctx.check(ctx.space.deployment(ctx.base, params))
        if reason and reason.startswith("backend sglang"):
            refused.append(reason)
    assert not refused, refused[0]


def test_overrides_reach_the_settings() -> None:
    settings = build_settings(
        compose_config(
            "chat",
            ["study.n_trials=3", "slo.ttft_ms=500", "model=llama-tiny", "objectives=throughput_latency"],
        )
    )
    assert settings.study.n_trials == 3
    assert settings.objectives.constraints["p99_ttft_ms"] == 500  # interpolated from the slo group
    assert settings.deployment["model"]["path"] == "llama-tiny"


def test_unknown_keys_are_rejected_by_name() -> None:
    with pytest.raises(UsageError, match=r"study\.n_trail"):
        compose_config("chat", ["study.n_trail=3"])
    with pytest.raises(UsageError, match="n_trail"):
        build_settings(compose_config("chat", ["+study.n_trail=3"]))
    with pytest.raises(UsageError, match=r"study\.sampler"):
        build_settings(compose_config("chat", ["study.sampler=annealing"]))
    with pytest.raises(UsageError, match=r"conf/nope\.yaml"):
        compose_config("nope")


def test_a_misspelled_objective_metric_is_an_error_before_any_launch() -> None:
    settings = build_settings(compose_config("chat", ["+objectives.directions.p99_ttfr_ms=minimize"]))
    with pytest.raises(ValueError, match="p99_ttfr_ms"):
        build_context(settings)


def test_a_fixed_value_that_is_also_searched_is_an_error() -> None:
    settings = build_settings(compose_config("chat", ["+deployment.scheduler.policy=static"]))
    with pytest.raises(ValueError, match=r"scheduler\.policy"):
        build_context(settings)


def test_parse_args() -> None:
    invocation = parse_args(["conf=summarise", "study.n_trials=2", "--cfg"])
    assert (
        invocation.conf == "summarise"
        and invocation.overrides == ("study.n_trials=2",)
        and invocation.print_config
    )
    with pytest.raises(UsageError, match="key=value"):
        parse_args(["chat"])


def test_cfg_prints_the_resolved_config_without_running(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert run_command.main(["conf=chat", "study.n_trials=5", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert "n_trials: 5" in out and "slo_attainment: 0.9" in out and "${" not in out
