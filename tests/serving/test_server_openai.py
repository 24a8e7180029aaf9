"""The builtin server through the real `openai` client and raw HTTP: shapes, usage counts, endpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from serving.launch import ServerProcess

MODEL = "llama-tiny"


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=60) as c:
        yield c


def tokenized_len(http: httpx.Client, **body: object) -> int:
    reply = http.post("/tokenize", json={"model": MODEL, **body})
    reply.raise_for_status()
    data = reply.json()
    assert data["count"] == len(data["tokens"]) and data["max_model_len"] == 512
    return int(data["count"])


def sse_events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    """Raw `data:` payloads of a streamed response, checking the framing on the way."""
    with http.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = reply.read().decode()
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [b.removeprefix("data: ") for b in blocks[:-1]]


def test_completion_with_exact_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    prompt = "The quick brown fox jumps over the lazy dog"
    result = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.prompt_tokens == tokenized_len(http, prompt=prompt)
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    assert result.choices[0].text


def test_completion_from_token_ids_is_deterministic_when_greedy(client: openai.OpenAI) -> None:
    ids = [31994, 3853, 5107, 11]
    first = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    again = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert first.usage is not None and first.usage.prompt_tokens == 4
    assert first.choices[0].text == again.choices[0].text


def test_seeded_sampling_repeats(client: openai.OpenAI) -> None:
    texts = {
        client.completions.create(
            model=MODEL,
            prompt="Once",
            max_tokens=10,
            seed=7,
            temperature=1.0,
            top_p=0.9,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(texts) == 1


def test_streamed_completion_one_chunk_per_token_and_usage_last(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt="Hello there",
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 9
    assert all(c.usage is None for c in token_chunks)
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 8 + ["length"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.prompt_tokens == tokenized_len(http, prompt="Hello there")
    assert usage.usage.completion_tokens == 9
    assert len({c.id for c in chunks}) == 1


def test_chat_streamed_and_not_with_exact_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Summarise the plot of Hamlet."},
    ]
    expected_prompt = tokenized_len(http, messages=messages)
    whole = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=7,
        extra_body={"ignore_eos": True},
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (expected_prompt, 7)

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 6
    assert token_chunks[0].choices[0].delta.role == "assistant"
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (expected_prompt, 6)


def test_raw_stream_matches_vllm_shapes(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "prompt": "abc",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "repetition_penalty": 1.0,
        "logprobs": None,
    }
    events = sse_events(http, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 4
    for chunk in chunks[:3]:
        assert set(chunk) == {"id", "object", "created", "model", "choices", "usage"}
        assert chunk["object"] == "text_completion" and chunk["usage"] is None
        assert set(chunk["choices"][0]) >= {"index", "text", "logprobs", "finish_reason"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3

    without_usage = sse_events(http, "/v1/completions", {**body, "stream_options": None, "priority": 3})
    assert [json.loads(e).get("usage", "absent") for e in without_usage[:-1]] == ["absent"] * 3

    continuous = {"include_usage": True, "continuous_usage_stats": True}
    running = sse_events(http, "/v1/completions", {**body, "stream_options": continuous})
    assert [json.loads(e)["usage"]["completion_tokens"] for e in running[:-1]] == [1, 2, 3, 3]


def test_stop_string_ends_the_output(client: openai.OpenAI) -> None:
    ids = [31994, 3853]
    free = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"greedy output too uniform for this test: {text!r}"
    cut = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.usage is not None and cut.usage.completion_tokens < 20


def test_models_tokenize_detokenize(client: openai.OpenAI, http: httpx.Client) -> None:
    (card,) = client.models.list().data
    assert card.id == MODEL
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": "héllo 🎉"}).json()["tokens"]
    assert (
        http.post("/detokenize", json={"model": MODEL, "tokens": tokens})
        .json()["prompt"]
        .endswith("héllo 🎉")
    )
    without_bos = http.post("/tokenize", json={"prompt": "héllo 🎉", "add_special_tokens": False}).json()
    assert without_bos["count"] == len(tokens) - 1


def test_health_and_metrics(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in (
        "serving_num_requests_waiting",
        "serving_num_requests_running",
        "serving_kv_cache_blocks_used",
        "serving_kv_cache_blocks_total",
        "serving_generation_tokens_total",
        "serving_step_duration_seconds_bucket",
        'serving_http_requests_total{path="/v1/completions",status="200"}',
        "serving_http_request_duration_seconds_bucket",
        'serving_request_finished_total{finish_reason="length"}',
    ):
        assert name in text, name
