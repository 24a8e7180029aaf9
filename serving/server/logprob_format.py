"""Logprobs in the shapes vLLM's OpenAI server sends them.

Completions (the legacy OpenAI shape): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict
per position: the chosen token first, then the `logprobs` most likely ones) and `text_offset` (each
token's start, counted over the token strings, continuing across stream chunks). An echoed prompt's
first token has `null` logprob and alternatives. Chat: `content` is a list of {token, logprob, bytes,
top_logprobs} with the `top_logprobs` most likely tokens. Token strings are each token decoded alone
with special tokens kept; -inf is sent as -9999.0 (JSON has no infinity), as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serving.engine.outputs import TokenLogprob

FLOOR = -9999.0
"""What -inf logprobs are sent as."""


class TokenTexts:
    """Token id -> its text as logprobs show it; cached because alternatives repeat across positions."""

    def __init__(self, tokenizer: Any, *, as_ids: bool = False) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._as_ids = as_ids

    def as_ids(self) -> TokenTexts:
        """The same, naming tokens `token_id:<id>` (vLLM's return_tokens_as_token_ids)."""
        return TokenTexts(self._tokenizer, as_ids=True)

    def __call__(self, token_id: int) -> str:
        if self._as_ids:
            return f"token_id:{token_id}"
        text = self._cache.get(token_id)
        if text is None:
            text = str(self._tokenizer.decode([token_id], skip_special_tokens=False))
            self._cache[token_id] = text
        return text


def prompt_positions(
    prompt_ids: Sequence[int], prompt_logprobs: Sequence[TokenLogprob]
) -> list[tuple[int, TokenLogprob | None]]:
    """An echoed prompt's positions: the first token has no logprob (nothing precedes it)."""
    return [(prompt_ids[0], None), *((lp.token_id, lp) for lp in prompt_logprobs)]


def completion_logprobs(
    texts: TokenTexts, positions: Sequence[tuple[int, TokenLogprob | None]], offset: int
) -> tuple[dict[str, Any], int]:
    """The `logprobs` object of a completion choice (or chunk) and the text offset after it."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, lp in positions:
        token = texts(token_id)
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if lp is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(_clamp(lp.logprob))
        alternatives = {token: _clamp(lp.logprob)}
        for alt_id, alt_lp in lp.top:
            alternatives.setdefault(texts(alt_id), _clamp(alt_lp))
        top.append(alternatives)
    body = {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top}
    return body, offset


def vllm_prompt_logprobs(
    texts: TokenTexts, prompt_logprobs: Sequence[TokenLogprob]
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs` of an echoed completion: per position {token id: logprob, rank, text}."""
    field: list[dict[str, dict[str, Any]] | None] = [None]
    for lp in prompt_logprobs:
        entry = {str(lp.token_id): _ranked(texts, lp.token_id, lp.logprob, lp.rank)}
        for rank, (alt_id, alt_lp) in enumerate(lp.top, start=1):
            entry.setdefault(str(alt_id), _ranked(texts, alt_id, alt_lp, rank))
        field.append(entry)
    return field


def chat_logprobs(texts: TokenTexts, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The `logprobs` object of a chat choice (or chunk)."""
    content = []
    for lp in logprobs:
        entry = _chat_token(texts(lp.token_id), lp.logprob)
        entry["top_logprobs"] = [_chat_token(texts(t), alt) for t, alt in lp.top]
        content.append(entry)
    return {"content": content}


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _clamp(logprob), "bytes": list(token.encode("utf-8"))}


def _ranked(texts: TokenTexts, token_id: int, logprob: float, rank: int) -> dict[str, Any]:
    return {"logprob": _clamp(logprob), "rank": rank, "decoded_token": texts(token_id)}


def _clamp(logprob: float) -> float:
    return max(logprob, FLOOR)
