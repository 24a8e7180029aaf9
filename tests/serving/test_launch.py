"""ServerProcess: start, health, pinning, peak RSS, clean SIGTERM exit, early-exit errors, no leftovers."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from serving.backends import get_backend
from serving.backends.builtin import BuiltinBackend
from serving.config import ConfigError, DeploymentConfig
from serving.launch import ServerProcess, ServerStartError, free_port


def group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def test_lifecycle_pinned_serving_then_sigterm_exits_0(
    tmp_path: Path, make_config: Callable[..., DeploymentConfig], startup_timeout: float
) -> None:
    log_path = tmp_path / "logs" / "trial-1.log"
    port = free_port()
    config = make_config(**{"server.port": port})
    server = ServerProcess(config, log_path=log_path, cpus=[0])
    with server:
        server.wait_healthy(startup_timeout)
        assert server.pid is not None
        assert os.getpgid(server.pid) == server.pid  # its own process group
        assert psutil.Process(server.pid).cpu_affinity() == [0]
        assert server.url == f"http://127.0.0.1:{port}"
        reply = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert reply.json()["usage"]["completion_tokens"] == 3
        pid = server.pid
    assert server.returncode == 0
    assert server.peak_rss_bytes > 50 * 2**20  # python + torch + model: tens of MB at least
    assert not group_members(pid)
    assert "ready: serving llama-tiny" in log_path.read_text()
    written = DeploymentConfig.from_yaml(log_path.with_name("trial-1.deploy.yaml"))
    assert written == config
    assert server.stop() == 0  # stopping again is harmless


def test_sigterm_during_a_stream_still_exits_0(
    tmp_path: Path, make_config: Callable[..., DeploymentConfig], startup_timeout: float
) -> None:
    server = ServerProcess(make_config(), log_path=tmp_path / "server.log")
    server.start()
    try:
        server.wait_healthy(startup_timeout)
        started = threading.Event()
        body = {"prompt": "go", "max_tokens": 450, "ignore_eos": True, "stream": True}

        def stream() -> None:
            try:
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as reply:
                    for _ in reply.iter_lines():
                        started.set()
            except httpx.HTTPError:
                pass  # the server may cut the stream at its graceful-shutdown deadline
            finally:
                started.set()

        worker = threading.Thread(target=stream)
        worker.start()
        assert started.wait(60)
    finally:
        code = server.stop(timeout_s=20)
    worker.join(30)
    assert code == 0
    assert not group_members(server.pid or -1)


def test_early_exit_raises_with_the_log_tail(
    tmp_path: Path, make_config: Callable[..., DeploymentConfig], startup_timeout: float
) -> None:
    config = make_config(**{"model.path": "/nonexistent/model-dir"})
    server = ServerProcess(config, log_path=tmp_path / "server.log")
    server.start()
    with pytest.raises(ServerStartError) as info:
        server.wait_healthy(startup_timeout)
    message = str(info.value)
    assert "exited with code 2" in message
    assert "model.path" in message  # the server's one-line config error is in the tail
    assert "Traceback" not in message
    assert server.returncode == 2
    assert not info.value.transient  # the deployment's own fault: a study does not launch it again


def test_time_out_stops_the_server(tmp_path: Path, make_config: Callable[..., DeploymentConfig]) -> None:
    server = ServerProcess(make_config(), log_path=tmp_path / "server.log")
    server.start()
    with pytest.raises(ServerStartError, match="not healthy") as info:
        server.wait_healthy(0.01)
    assert info.value.transient  # a slow start: a study launches it once more
    assert server.returncode is not None
    assert not group_members(server.pid or -1)


def test_backends(make_config: Callable[..., DeploymentConfig]) -> None:
    backend = get_backend("builtin")
    assert isinstance(backend, BuiltinBackend) and backend.health_path == "/health"
    config = make_config(**{"scheduler.max_num_seqs": 8})
    argv = backend.command(config, 1234)
    assert argv[1:4] == ["-m", "serving.cli", "serve"]
    assert "scheduler.max_num_seqs=8" in argv and argv[-2:] == ["--port", "1234"]
    env = backend.env(config, [0, 1])
    assert env["OMP_NUM_THREADS"] == "2"
    with pytest.raises(ConfigError, match="unknown"):
        get_backend("tgi")


def test_builtin_command_without_a_file_round_trips(make_config: Callable[..., DeploymentConfig]) -> None:
    """The --set form of the command rebuilds the same config (checked through the CLI's resolver)."""
    from serving.cli import resolve_config

    config = make_config(**{"model.served_model_name": "007", "scheduler.batch_wait_ms": 2.5})
    argv = BuiltinBackend().command(config, 0)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert resolve_config(None, sets, port=0) == config
