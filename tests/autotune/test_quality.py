"""The quality guard on real servers: the reference scored against itself, a damaging quantisation of a
model trained on the spot flagged while int8 passes, the cache, a failed probe; and the scoring math."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autotune.config.settings import ObjectivesSettings
from autotune.quality.guard import QualityGuard
from autotune.quality.probe import Scored, compare, top_k_kl
from autotune.quality.settings import QualitySettings
from autotune.report import quality as quality_report
from autotune.report.objectives import Objectives
from autotune.report.results import TrialRecord
from autotune.traffic.config import WorkloadConfig
from serving.config import ConfigError, DeploymentConfig
from serving.launch import ServerProcess
from tests.trained_model import train

STARTUP_TIMEOUT_S = 180.0
SMALL = {"num_prompts": 4, "max_prompt_tokens": 32, "max_tokens": 12}
"""A probe of seconds: four prompts, 32 prompt tokens, 12 continuation tokens."""


def deployment(model: str, **flat: Any) -> DeploymentConfig:
    base = {"model.path": model, "model.max_model_len": 256, "cache.kv_cache_memory_gb": 0.02}
    return DeploymentConfig().replace(**{**base, **flat})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("trained") / "grammar-llama")


@pytest.fixture(scope="module")
def trained_guard(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> QualityGuard:
    base = deployment(str(trained), **{"model.load_format": "auto"})
    run_dir = tmp_path_factory.mktemp("study")
    guard = QualityGuard(QualitySettings(**SMALL), base, WorkloadConfig(tokenizer=str(trained)), run_dir)
    guard.prepare()
    return guard


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(config: DeploymentConfig) -> ServerProcess:
        server = ServerProcess(
            config.replace(**{"server.port": 0}), log_path=tmp_path / f"{len(started)}.log"
        )
        started.append(server)
        server.start()
        server.wait_healthy(STARTUP_TIMEOUT_S)
        return server

    yield start
    for server in started:
        server.stop()


def probe(guard: QualityGuard, server: ServerProcess, trial_dir: Path) -> dict[str, float]:
    return guard.probe(server.url, server.config.model.name, trial_dir)


@pytest.mark.slow
def test_reference_against_itself_agrees_fully(
    trained_guard: QualityGuard, serve: Any, tmp_path: Path
) -> None:
    server = serve(trained_guard.reference_config)
    metrics = probe(trained_guard, server, tmp_path)
    assert metrics["quality_token_agreement"] == 1.0
    assert metrics["quality_mean_kl"] == 0.0
    assert metrics["quality_perplexity_ratio"] == 1.0
    assert metrics["quality_synthetic"] == 0.0
    assert json.loads((tmp_path / "quality.json").read_text())["metrics"] == metrics


@pytest.mark.slow
def test_nf4_is_flagged_and_int8_passes_on_the_trained_model(
    trained_guard: QualityGuard, serve: Any, tmp_path: Path
) -> None:
    """Measured here with this probe: int8_dynamic agreement 1.0, KL 0.009; bnb_nf4 agreement 0.92,
    KL 0.063 (over max_mean_kl 0.05). With the default probe (8 x 16 positions) nf4 fails both."""
    objectives = Objectives(ObjectivesSettings(directions={"output_throughput": "maximize"}))
    objectives = Objectives(objectives.settings, tuple(trained_guard.bounds()))
    results = {}
    for quant in ("int8_dynamic", "bnb_nf4"):
        server = serve(trained_guard.reference_config.replace(**{"precision.quantization": quant}))
        metrics = probe(trained_guard, server, tmp_path / quant)
        server.stop()
        results[quant] = objectives.constraint_values(metrics)
    assert all(v <= 0 for v in results["int8_dynamic"].values()), results
    assert any(v > 0 for v in results["bnb_nf4"].values()), results


@pytest.mark.slow
def test_cached_reference_is_reused_and_a_failed_probe_violates_the_bounds(
    trained_guard: QualityGuard, tmp_path: Path
) -> None:
    again = QualityGuard(
        trained_guard.settings,
        trained_guard.reference_config,
        trained_guard.workload,
        trained_guard.run_dir,
    )
    again.settings.reference_url = "http://127.0.0.1:9"  # nothing listens: only the cache can answer
    assert again._load() is None, "the reference URL is part of the cache key"
    again.settings.reference_url = None
    assert again.prepare().to_json() == trained_guard.prepare().to_json()
    metrics = again.probe("http://127.0.0.1:9", "grammar-llama", tmp_path)
    assert metrics == {"quality_synthetic": 0.0}
    assert "ConnectError" in json.loads((tmp_path / "quality.json").read_text())["error"]
    objectives = Objectives(
        ObjectivesSettings(directions={"output_throughput": "maximize"}), tuple(again.bounds())
    )
    assert all(v > 0 for v in objectives.constraint_values(metrics).values())


def test_dummy_weights_are_synthetic_and_bound_nothing_by_default() -> None:
    base = deployment("llama-tiny")
    guard = QualityGuard(QualitySettings(), base, WorkloadConfig(), Path("unused"))
    assert guard.synthetic and guard.bounds() == []
    enforced = QualityGuard(
        QualitySettings(enforce_on_dummy_weights=True), base, WorkloadConfig(), Path("unused")
    )
    assert [m for m, _, _ in enforced.bounds()] == ["quality_token_agreement", "quality_mean_kl"]
    assert guard.reference_config.precision.quantization == "none"


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_prompts", 0), ("top_logprobs", 21), ("min_token_agreement", 1.5), ("max_mean_kl", -1.0)],
)
def test_bad_settings_are_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"quality.{field}={value}"):
        QualitySettings(**{field: value})


def test_a_bad_reference_override_names_the_section() -> None:
    with pytest.raises(ConfigError, match=re.escape("quality.reference: precision.quantization='int3'")):
        QualityGuard(
            QualitySettings(reference={"precision.quantization": "int3"}),
            deployment("llama-tiny"),
            WorkloadConfig(),
            Path("unused"),
        )


def test_top_k_kl_is_zero_for_the_same_distribution_and_grows_with_change() -> None:
    ref = {1: math.log(0.7), 2: math.log(0.2), 3: math.log(0.05)}
    assert top_k_kl(ref, dict(ref)) == 0.0
    near = {1: math.log(0.65), 2: math.log(0.25), 3: math.log(0.05)}
    far = {2: math.log(0.6), 1: math.log(0.3), 4: math.log(0.05)}
    assert 0 < top_k_kl(ref, near) < top_k_kl(ref, far)


def test_compare_scores_agreement_on_the_continuation_only() -> None:
    """Two positions: a prompt position (where the trial disagrees: not counted) and one continuation."""
    ref = Scored(
        [5, 6], [math.log(0.5), math.log(0.9)], [{5: math.log(0.5), 7: math.log(0.4)}, {6: math.log(0.9)}]
    )
    cand = Scored(
        [5, 6], [math.log(0.3), math.log(0.8)], [{7: math.log(0.6), 5: math.log(0.3)}, {6: math.log(0.8)}]
    )
    fidelity = compare([ref], [cand], [1])
    assert fidelity.token_agreement == 1.0
    assert fidelity.mean_kl > 0
    assert fidelity.perplexity == pytest.approx(1 / 0.8)
    assert fidelity.reference_perplexity == pytest.approx(1 / 0.9)


def record(number: int, **metrics: float) -> TrialRecord:
    return TrialRecord(number, "COMPLETE", {}, {}, dict(metrics), (1.0,))


def test_report_shows_quality_next_to_speed_and_says_when_it_is_synthetic() -> None:
    real = [record(0, output_throughput=10.0, quality_synthetic=0.0, quality_token_agreement=0.75)]
    assert quality_report.header(real) == ["token agreement", "mean KL", "perplexity ratio"]
    assert quality_report.cells(real[0], real) == [0.75, "", ""]
    assert "synthetic" not in quality_report.note(real)
    dummy = [record(1, quality_synthetic=1.0, quality_token_agreement=0.5, quality_mean_kl=0.01)]
    assert "synthetic" in quality_report.note(dummy) and "not enforced" in quality_report.note(dummy)
    assert "synthetic" in quality_report.summary(dummy[0])
    unprobed = [record(2, output_throughput=3.0)]
    assert quality_report.header(unprobed) == [] and quality_report.note(unprobed) == ""
