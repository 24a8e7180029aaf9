"""Response bodies and SSE framing in the shapes OpenAI and vLLM send.

Streams: one `data: {...}\\n\\n` per token, then (with stream_options.include_usage) a chunk with
`choices: []` and the usage, then `data: [DONE]`. With include_usage every other chunk carries
`"usage": null`, as OpenAI documents. Chat puts `role` into the first token's delta rather than a
token-less chunk of its own, so the number of chunks with choices equals the number of tokens.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serving.server.errors import APIError
from serving.server.generation import Completion, TokenEvent

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": num_prompt_tokens + num_output_tokens,
    }


@dataclass
class ResponseIds:
    """Identity shared by every chunk of one response."""

    prefix: str
    model: str
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{self.prefix}-{uuid.uuid4().hex}"


# --- /v1/completions ---------------------------------------------------------------------------


def completion_chunk(
    ids: ResponseIds,
    event: TokenEvent,
    *,
    with_usage: bool,
    continuous: bool,
    index: int = 0,
    text: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> str:
    """One token of choice `index`; `text` replaces the event's (an echoed prompt before the first token)."""
    choice = _choice("text", event.text if text is None else text, event, index, logprobs)
    return sse(_chunk(ids, "text_completion", choice, event, with_usage, continuous))


def completion_body(ids: ResponseIds, done: Completion) -> dict[str, Any]:
    return choices_body(ids, "text_completion", [_choice("text", done.text, done)], usage_of([done]))


def completion_choice(
    index: int, text: str, done: Completion, logprobs: dict[str, Any] | None, prompt_logprobs: Any
) -> dict[str, Any]:
    """A non-streamed completion's choice; vLLM adds `prompt_logprobs` (null unless echoed with logprobs)."""
    return {**_choice("text", text, done, index, logprobs), "prompt_logprobs": prompt_logprobs}


# --- /v1/chat/completions ----------------------------------------------------------------------


def chat_chunk(
    ids: ResponseIds,
    event: TokenEvent,
    *,
    first: bool,
    with_usage: bool,
    continuous: bool,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> str:
    delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
    choice = _choice("delta", delta, event, index, logprobs)
    return sse(_chunk(ids, "chat.completion.chunk", choice, event, with_usage, continuous))


def chat_body(ids: ResponseIds, done: Completion) -> dict[str, Any]:
    return choices_body(ids, "chat.completion", [chat_choice(0, done, None)], usage_of([done]))


def chat_choice(index: int, done: Completion, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return _choice("message", {"role": "assistant", "content": done.text}, done, index, logprobs)


def choices_body(
    ids: ResponseIds, obj: str, choices: list[dict[str, Any]], counts: dict[str, int]
) -> dict[str, Any]:
    """A non-streamed body: every choice, then the request's usage."""
    return {**_envelope(ids, obj, choices), "usage": counts}


def usage_of(dones: list[Completion]) -> dict[str, int]:
    """The prompt counted once, the outputs of every generated choice (best_of candidates too) summed."""
    return usage(dones[0].num_prompt_tokens, sum(d.num_output_tokens for d in dones))


def usage_chunk(ids: ResponseIds, obj: str, num_prompt_tokens: int, num_output_tokens: int) -> str:
    """The last chunk under stream_options.include_usage: no choices, the request's usage."""
    return sse({**_envelope(ids, obj, []), "usage": usage(num_prompt_tokens, num_output_tokens)})


def error_event(err: APIError) -> str:
    """An error after the stream has begun (the 200 status line is already sent), as vLLM sends it."""
    return sse(err.body())


def _chunk(
    ids: ResponseIds,
    obj: str,
    choice: dict[str, Any],
    event: TokenEvent,
    with_usage: bool,
    continuous: bool,
) -> dict[str, Any]:
    chunk = _envelope(ids, obj, [choice])
    if continuous:
        chunk["usage"] = usage(event.num_prompt_tokens, event.num_output_tokens)
    elif with_usage:
        chunk["usage"] = None
    return chunk


def _envelope(ids: ResponseIds, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields every body and chunk starts with."""
    return {"id": ids.id, "object": obj, "created": ids.created, "model": ids.model, "choices": choices}


def _choice(
    key: str,
    content: Any,
    ending: TokenEvent | Completion,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One choice: its content under `key` (text, delta or message), then how it ended (None until then)."""
    return {
        "index": index,
        key: content,
        "logprobs": logprobs,
        "finish_reason": ending.finish_reason,
        "stop_reason": ending.stop_reason,
    }
