"""The server's pure parts: incremental detokenisation, stop strings, request validation, SSE framing."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer

from serving.config import SHIPPED_MODELS_DIR
from serving.server.detokenizer import IncrementalDetokenizer
from serving.server.errors import APIError, from_validation_error
from serving.server.generation import TokenEvent
from serving.server.protocol import ChatCompletionRequest, CompletionRequest
from serving.server.responses import DONE, ResponseIds, completion_chunk, usage_chunk
from serving.server.stop_strings import StopStringMatcher


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(SHIPPED_MODELS_DIR / "llama-tiny" / "tokenizer.json"))


# --- detokenizer --------------------------------------------------------------------------------


def test_pieces_join_to_the_full_decode_and_never_split_a_character(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Say something:").ids
    output = tokenizer.encode(" héllo 日本語 🎉 and more", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.step(t) for t in output]
    assert "".join(pieces) == " héllo 日本語 🎉 and more"
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # the multi-token emoji and CJK characters were held back until complete


def test_random_tokens_decode_as_a_whole(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    prompt = tokenizer.encode("Hello").ids
    output = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(500)]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    streamed = "".join(detok.step(t) for t in output)
    full = tokenizer.decode(prompt + output, skip_special_tokens=True)
    assert full.endswith(streamed)
    assert full[: len(full) - len(streamed)] == tokenizer.decode(prompt, skip_special_tokens=True)


def test_first_output_token_keeps_its_leading_space(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello").ids)
    (world,) = tokenizer.encode(" world", add_special_tokens=False).ids
    assert detok.step(world) == " world"


# --- stop strings -------------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> str:
    out = ""
    for piece in pieces:
        out += matcher.feed(piece)
        if matcher.matched:
            return out
    return out + matcher.flush()


def test_stop_string_split_over_pieces_is_never_sent() -> None:
    matcher = StopStringMatcher(["STOP"])
    sent = []
    for piece in ["abc S", "T", "OP tail"]:
        sent.append(matcher.feed(piece))
    assert "".join(sent) == "abc "
    assert matcher.matched == "STOP"
    assert all("S" not in s for s in sent)


def test_stop_string_included_when_asked() -> None:
    assert feed_all(StopStringMatcher(["\n\n"], include_stop=True), ["a\n", "\nb"]) == "a\n\n"


def test_earliest_stop_string_wins_and_text_without_match_is_all_flushed() -> None:
    assert feed_all(StopStringMatcher(["cd", "b"]), ["abcd"]) == "a"
    assert feed_all(StopStringMatcher(["xyz"]), ["ab", "xy", "c"]) == "abxyc"
    assert feed_all(StopStringMatcher([]), ["ab", "c"]) == "abc"


# --- request validation -------------------------------------------------------------------------


def api_error(model: type[CompletionRequest | ChatCompletionRequest], body: dict[str, Any]) -> APIError:
    try:
        req = model.model_validate_json(json.dumps(body))
    except ValidationError as err:
        return from_validation_error(err)
    with pytest.raises(APIError) as info:
        req.check_supported()
        req.output_options()
        if isinstance(req, CompletionRequest):
            req.single_prompt()
    return info.value


def test_vllm_benchmark_payloads_are_accepted() -> None:
    completion = {
        "model": "m",
        "prompt": "hi",
        "repetition_penalty": 1.0,
        "max_tokens": 8,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    CompletionRequest.model_validate_json(json.dumps(completion)).check_supported()
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
        "user": "bench",
    }
    req = ChatCompletionRequest.model_validate_json(json.dumps(chat))
    req.check_supported()
    assert req.output_limit == 8


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": "x", "frobnicate": 1}, "frobnicate", "unknown_field"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"prompt": "x", "n": 0}, "n", "invalid_value"),
        ({"prompt": "x", "n": 129}, "n", "invalid_value"),
        ({"prompt": "x", "n": 2, "temperature": 0}, "n", "invalid_value"),
        ({"prompt": "x", "n": 3, "best_of": 2}, "best_of", "invalid_value"),
        ({"prompt": "x", "best_of": 2, "stream": True}, "best_of", "invalid_value"),
        ({"prompt": "x", "repetition_penalty": 1.2}, "repetition_penalty", "unsupported_value"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "invalid_value"),
        ({"prompt": "x", "logprobs": -1}, "logprobs", "invalid_value"),
        ({"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
        ({"prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
        (
            {"prompt": "x", "stream_options": {"include_usage": True, "extra": 1}},
            "stream_options.extra",
            None,
        ),
        ({"max_tokens": 3}, "prompt", "missing_field"),
    ],
)
def test_bad_completion_fields_are_named(body: dict[str, Any], param: str, code: str | None) -> None:
    err = api_error(CompletionRequest, body)
    assert err.status == 400
    assert err.param == param
    if code:
        assert err.code == code
    assert param.split(".")[-1] in err.message


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"echo": True}, "echo", "unsupported_value"),
        ({"n": 2, "temperature": 0}, "n", "invalid_value"),
    ],
)
def test_bad_chat_fields_are_named(body: dict[str, Any], param: str, code: str) -> None:
    err = api_error(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], **body})
    assert (err.status, err.param, err.code) == (400, param, code)
    assert param in err.message


def test_non_text_chat_content_is_refused_by_name() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    err = api_error(ChatCompletionRequest, body)
    assert err.param is not None and err.param.startswith("messages.0.content")


# --- SSE framing --------------------------------------------------------------------------------


def test_usage_chunk_has_no_choices_and_token_chunks_carry_null_usage() -> None:
    ids = ResponseIds("cmpl", "m")
    token = completion_chunk(ids, TokenEvent("hé", 3, 1), with_usage=True, continuous=False)
    assert token.startswith("data: ") and token.endswith("\n\n")
    body = json.loads(token.removeprefix("data: "))
    assert body["usage"] is None and body["choices"][0]["text"] == "hé"
    last = json.loads(usage_chunk(ids, "text_completion", 3, 5).removeprefix("data: "))
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert last["id"] == body["id"]
    assert DONE == "data: [DONE]\n\n"
