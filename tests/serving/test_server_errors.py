"""Bad input gets a 4xx with an OpenAI-style body, and the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from serving.launch import ServerProcess

MODEL = "llama-tiny"
MAX_MODEL_LEN = 512  # tests/serving/conftest.py

CASES: list[tuple[str, str, Any, int, str | None, str | None]] = [
    # (name, path, body (str = raw bytes), status, param, code)
    ("malformed json", "/v1/completions", '{"prompt": "x",', 400, None, "invalid_json"),
    ("empty body", "/v1/chat/completions", "", 400, None, "invalid_json"),
    ("not an object", "/v1/completions", "[1, 2]", 400, None, "invalid_body"),
    ("unknown field", "/v1/completions", {"prompt": "x", "max_tokns": 5}, 400, "max_tokns", "unknown_field"),
    (
        "unknown chat field",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "foo": 1},
        400,
        "foo",
        "unknown_field",
    ),
    (
        "max_tokens zero",
        "/v1/completions",
        {"prompt": "x", "max_tokens": 0},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max_tokens negative",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
        400,
        "max_tokens",
        "invalid_value",
    ),
    ("n=0", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ("greedy n=2", "/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "n", "invalid_value"),
    ("logprobs=21", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "invalid_value"),
    (
        "top_logprobs without logprobs",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
        "invalid_value",
    ),
    (
        "prompt too long",
        "/v1/completions",
        {"prompt": [5] * (MAX_MODEL_LEN + 10), "max_tokens": 1},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "prompt fills context",
        "/v1/completions",
        {"prompt": [5] * MAX_MODEL_LEN},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "prompt + max_tokens too long",
        "/v1/completions",
        {"prompt": [5] * 500, "max_tokens": 13},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "chat too long",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi " * 600}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    ("empty token prompt", "/v1/completions", {"prompt": []}, 400, "prompt", "invalid_value"),
    ("token id outside vocab", "/v1/completions", {"prompt": [1, 32000]}, 400, "prompt", "invalid_value"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages", None),
    (
        "unknown role",
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
        None,
    ),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    (
        "unknown model chat",
        "/v1/chat/completions",
        {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
        "model_not_found",
    ),
    (
        "tokenize both inputs",
        "/tokenize",
        {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
        400,
        "prompt",
        None,
    ),
    ("unknown route", "/v1/embeddings", {"input": "x"}, 404, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error_body(tiny_server: ServerProcess, case: tuple[Any, ...]) -> None:
    _, path, body, status, param, code = case
    reply = _post(tiny_server.url, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert param.split(".")[-1] in error["message"]


def test_wrong_method_is_405_with_error_body(tiny_server: ServerProcess) -> None:
    reply = httpx.get(tiny_server.url + "/v1/completions")
    assert reply.status_code == 405
    assert reply.json()["error"]["message"]


def test_openai_client_sees_typed_errors(tiny_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt=[5] * 600, max_tokens=1)
    assert too_long.value.code == "context_length_exceeded"


async def test_bad_requests_do_not_disturb_a_running_stream(tiny_server: ServerProcess) -> None:
    good = {
        "model": MODEL,
        "prompt": "A long story:",
        "max_tokens": 120,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(base_url=tiny_server.url, timeout=120) as client:

        async def stream() -> tuple[int, int]:
            chunks = 0
            usage: dict[str, int] = {}
            async with client.stream("POST", "/v1/completions", json=good) as reply:
                assert reply.status_code == 200
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        data = json.loads(line.removeprefix("data: "))
                        chunks += bool(data["choices"])
                        usage = data.get("usage") or usage
            return chunks, usage["completion_tokens"]

        async def bad() -> list[int]:
            codes = []
            for _, path, body, status, _, _ in CASES * 2:
                content = body if isinstance(body, str) else json.dumps(body)
                reply = await client.post(path, content=content)
                assert reply.status_code == status
                codes.append(reply.status_code)
            return codes

        (chunks, tokens), codes = await asyncio.gather(stream(), bad())
    assert (chunks, tokens) == (120, 120)
    assert len(codes) == 2 * len(CASES)
    assert httpx.get(tiny_server.url + "/health").status_code == 200


def _post(url: str, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
