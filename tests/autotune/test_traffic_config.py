"""Configs: every shipped YAML composes and builds; unknown keys and bad values are rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.commands.bench import CONF_DIR, compose_config
from autotune.traffic.config import ArrivalConfig, ClientConfig, SLOConfig, WorkloadConfig

WORKLOADS = sorted(p.stem for p in (CONF_DIR / "workload").glob("*.yaml"))
ARRIVALS = sorted(p.stem for p in (CONF_DIR / "arrival").glob("*.yaml"))


def test_the_promised_options_ship() -> None:
    assert {"chat", "summarise", "chat_gpu", "summarise_gpu"} <= set(WORKLOADS)
    assert {"poisson", "gamma", "constant", "closed"} <= set(ARRIVALS)
    assert (CONF_DIR / "slo" / "default.yaml").is_file()


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("arrival", ARRIVALS)
def test_every_config_composes(workload: str, arrival: str) -> None:
    cfg = compose_config([f"workload={workload}", f"arrival={arrival}"])
    w = WorkloadConfig.from_config(cfg.workload)
    a = ArrivalConfig.from_config(cfg.arrival)
    SLOConfig.from_config(cfg.slo)
    ClientConfig.from_config(cfg.client)
    assert w.name == workload and a.kind == arrival


def test_cpu_defaults_are_small() -> None:
    chat = WorkloadConfig.from_config(compose_config([]).workload)
    assert chat.prefix_len + chat.input_len.mean == 128 and chat.output_len.mean == 64


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: WorkloadConfig.from_config({"promt_len": 3}), r"workload: unknown key\(s\) \['promt_len'\]"),
        (
            lambda: WorkloadConfig.from_config({"input_len": {"mean": 5, "sdt": 1}}),
            "workload.input_len: unknown",
        ),
        (lambda: WorkloadConfig.from_config({"api": "embeddings"}), "workload.api='embeddings'"),
        (lambda: ArrivalConfig.from_config({"kind": "poisson", "burstiness": 2.0}), "burstiness applies"),
        (lambda: ArrivalConfig.from_config({"kind": "closed"}), "arrival.concurrency must be >= 1"),
        (lambda: ArrivalConfig.from_config({"rate": 0}), "arrival.rate must be a positive"),
        (lambda: ArrivalConfig.from_config({"num_requests": None}), "num_requests or arrival.duration_s"),
        (lambda: SLOConfig.from_config({"ttft": 5}), r"slo: unknown key\(s\) \['ttft'\]"),
        (lambda: SLOConfig.from_config({"ttft_ms": -1}), "slo.ttft_ms must be >= 0"),
        (lambda: ClientConfig.from_config({"processes": 0}), "client.processes must be >= 1"),
    ],
)
def test_bad_values_are_named(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_sweep_expands_rates_and_concurrencies() -> None:
    rates = ArrivalConfig.from_config({"sweep": [1, 2, 4]}).expand()
    assert [a.rate for a in rates] == [1.0, 2.0, 4.0] and all(a.sweep is None for a in rates)
    closed = ArrivalConfig.from_config({"kind": "closed", "concurrency": 1, "sweep": [2, 8]}).expand()
    assert [a.concurrency for a in closed] == [2, 8]


def test_conf_dir_is_the_repository_conf() -> None:
    assert Path(__file__).resolve().parents[2] / "conf" == CONF_DIR
