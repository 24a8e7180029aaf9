"""Security: loopback by default, the optional API key on /v1/*, and a key that no stored form holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from serving.api_key import resolve_api_key
from serving.backends import get_backend
from serving.config import API_KEY_ENV, REDACTED, ConfigError, DeploymentConfig
from serving.launch import ServerProcess

KEY = "sk-test-7f3a9c1e"


def test_a_key_is_redacted_in_every_stored_form_and_kept_in_the_object(tmp_path: Path) -> None:
    config = DeploymentConfig().replace(**{"server.api_key": KEY})
    assert config.server.api_key == KEY
    assert config.to_flat()["server.api_key"] == REDACTED
    assert config.to_dict()["server"]["api_key"] == REDACTED
    assert KEY not in config.to_yaml()
    assert config.replace(**{"server.port": 1}).server.api_key == KEY  # a copy serves with the same key
    path = tmp_path / "best.yaml"
    path.write_text(config.to_yaml())
    assert DeploymentConfig.from_yaml(path).server.api_key == REDACTED


def test_a_redacted_key_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    redacted = DeploymentConfig().replace(**{"server.api_key": REDACTED})
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=rf"server\.api_key.*{API_KEY_ENV}"):
        resolve_api_key(redacted)
    assert resolve_api_key(DeploymentConfig()) is None
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert resolve_api_key(redacted) == KEY
    assert resolve_api_key(DeploymentConfig()) == KEY  # null: the environment's key
    with pytest.raises(ConfigError, match=r"server\.api_key is empty"):
        DeploymentConfig().replace(**{"server.api_key": " "})


def test_external_engines_take_the_key_by_environment_or_refuse_it(fake_python: Path) -> None:
    vllm = DeploymentConfig(backend="vllm", engine_python=str(fake_python)).replace(
        **{"server.api_key": KEY, "model.path": "llama-tiny"}
    )
    backend = get_backend("vllm")
    assert KEY not in " ".join(backend.command(vllm, 8000))
    assert "--host 127.0.0.1" in " ".join(backend.command(vllm, 8000))
    env = backend.process_env(vllm, None, {API_KEY_ENV: "other"}, KEY)
    assert env["VLLM_API_KEY"] == KEY and API_KEY_ENV not in env
    sglang = DeploymentConfig(backend="sglang").replace(**{"server.api_key": KEY})
    with pytest.raises(ConfigError, match=r"server\.api_key"):
        get_backend("sglang").validate(sglang)
    # a launched server without a configured key gets none, even when this process has one
    builtin = get_backend("builtin").process_env(DeploymentConfig(), None, {API_KEY_ENV: KEY}, None)
    assert API_KEY_ENV not in builtin


def _listening_addresses(pid: int) -> set[str]:
    found = set()
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                found.add(conn.laddr.ip)
    return found


def test_key_protects_v1_and_leaks_nowhere(
    start_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, "not-this-one")  # the launcher passes exactly the config's key
    server = start_server(**{"server.api_key": KEY})
    assert server.pid is not None
    assert _listening_addresses(server.pid) == {"127.0.0.1"}
    body = {"model": "llama-tiny", "prompt": "Hi", "max_tokens": 2}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            reply = client.post("/v1/completions", json=body, headers=headers)
            assert reply.status_code == 401, reply.text
            assert reply.headers["www-authenticate"] == "Bearer"
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert KEY not in reply.text
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert api.completions.create(**body).usage.completion_tokens == 2  # type: ignore[union-attr]
    cmdline = " ".join(psutil.Process(server.pid).cmdline())
    server.stop()
    assert KEY not in cmdline
    assert KEY not in server.log_path.read_text()
    assert KEY not in server.config_path.read_text()
    assert REDACTED in server.config_path.read_text()
