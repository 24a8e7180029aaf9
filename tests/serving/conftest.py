"""Real servers for tests: `serving serve` with llama-tiny in its own process group on a free port.

Fixtures other test files may use:
  tiny_config      a DeploymentConfig for llama-tiny (context 512, small KV budget, free port)
  make_config      a factory: make_config(**{"dotted.key": value}) -> tiny_config with overrides
  startup_timeout  seconds to allow a server to become healthy on a busy machine
  tiny_server      one healthy ServerProcess per test module (stopped at the module's end)
  start_server     a factory: start_server(**dotted_overrides) -> healthy ServerProcess (stopped after)
  one_torch_thread torch on one thread for a module (tiny model: OpenMP barriers would dominate)
  paged_tiny_model llama-tiny on CPU with the paged attention, one per module
  engine_tiny_model the same under the lean forward and under transformers' (parametrised)
  fake_python      an executable stand-in for an engine's interpreter (backends check it exists)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.config import DeploymentConfig
from serving.engine.attention import attn_implementation_name
from serving.engine.model_loader import load_engine_model, load_model
from serving.launch import ServerProcess

STARTUP_TIMEOUT_S = 120.0
"""Generous: the machine is shared, and importing torch plus building the model takes seconds."""

TINY_OVERRIDES: dict[str, Any] = {
    "model.path": "llama-tiny",
    "model.max_model_len": 512,
    "scheduler.max_num_seqs": 64,
    "scheduler.max_num_batched_tokens": 2048,
    "cache.kv_cache_memory_gb": 0.05,
    "server.port": 0,
}


def tiny_deployment(**overrides: Any) -> DeploymentConfig:
    return DeploymentConfig().replace(**{**TINY_OVERRIDES, **overrides})


def start_healthy(config: DeploymentConfig, log_path: Path) -> ServerProcess:
    server = ServerProcess(config, log_path=log_path)
    server.start()
    server.wait_healthy(STARTUP_TIMEOUT_S)
    return server


@pytest.fixture(scope="session")
def tiny_config() -> DeploymentConfig:
    return tiny_deployment()


@pytest.fixture(scope="session")
def make_config() -> Callable[..., DeploymentConfig]:
    return tiny_deployment


@pytest.fixture(scope="session")
def startup_timeout() -> float:
    return STARTUP_TIMEOUT_S


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny model, all overhead: one thread skips OpenMP barriers that dominate (and spin on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def paged_tiny_model() -> torch.nn.Module:
    return load_model(tiny_deployment(device="cpu"), attn_implementation_name("paged"), torch.device("cpu"))


@pytest.fixture(scope="module", params=["lean", "transformers"])
def engine_tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """llama-tiny under both forwards the engine runs: its own (llama.py, built without transformers as
    the server builds it) and transformers'."""
    config, device = tiny_deployment(device="cpu"), torch.device("cpu")
    if request.param == "lean":
        return load_engine_model(config, device)
    return load_model(config, attn_implementation_name("paged"), device)


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    return python


@pytest.fixture(scope="module")
def tiny_server(
    tiny_config: DeploymentConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("tiny-server") / "server.log"
    server = start_healthy(tiny_config, log_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(**overrides: Any) -> ServerProcess:
        server = start_healthy(tiny_deployment(**overrides), tmp_path / f"server-{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
