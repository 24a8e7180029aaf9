"""Requests to prompt token ids, the same way for generation and /tokenize (usage counts match exactly).

Text prompts get the tokenizer's special tokens (BOS) as vLLM adds them; chat messages are rendered
by the tokenizer's chat template to text and tokenised without special tokens (the template writes
its own BOS), again as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serving.server.errors import APIError
from serving.server.protocol import ChatMessage


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return list(ids)


def encode_chat(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError("This model's tokenizer has no chat_template; use /v1/completions", param="messages")
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("tokenize", "add_generation_prompt", "conversation", "messages"):
        if reserved in kwargs:
            raise APIError(
                f"chat_template_kwargs.{reserved} is set by the server; remove it",
                param=f"chat_template_kwargs.{reserved}",
            )
    try:
        text = tokenizer.apply_chat_template(
            [m.for_template() for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except Exception as err:  # jinja raises on templates that reject a conversation
        raise APIError(f"The chat template rejected these messages: {err}", param="messages") from None
    return encode_text(tokenizer, str(text), add_special_tokens=False)


def check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    for i, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise APIError(
                f"{param}[{i}]={token} is not a token id of this model; use 0..{vocab_size - 1}",
                param=param,
                code="invalid_value",
            )


def output_budget(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """max_tokens after checking prompt + output fit the context; None means all that is left."""
    if prompt_len == 0:
        raise APIError("The prompt is empty; send at least one token", param=param, code="invalid_value")
    room = max_model_len - prompt_len
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = prompt_len + (max_tokens if max_tokens is not None else 1)
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{asked} tokens ({prompt_len} in the {param}, {asked - prompt_len} for the completion). "
            f"Please reduce the length of the {param} or of max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    return room if max_tokens is None else max_tokens
