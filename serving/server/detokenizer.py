"""Incremental detokenisation: text per generated token, never a broken UTF-8 character.

tokenizers' DecodeStream holds back tokens until they form whole characters (byte-level BPE splits
an emoji over several tokens). It is primed with the prompt's last tokens so the first output token
decodes with its leading space exactly as a full decode of prompt + output would.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

log = logging.getLogger(__name__)

PROMPT_CONTEXT_TOKENS = 6
"""Prompt tokens fed to the stream first: enough for merges and leading-space rules at the boundary."""


def backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The Rust tokenizer behind a transformers fast tokenizer; slow tokenizers are not supported."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(
            f"{type(tokenizer).__name__} has no tokenizers backend: serve a model with a tokenizer.json"
        )
    return backend


class IncrementalDetokenizer:
    """Turns one request's output tokens into text pieces whose concatenation is the full text."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._stream = DecodeStream(ids=self._context, skip_special_tokens=True)
        self._recent: list[int] = []

    def step(self, token_id: int) -> str:
        """Text completed by this token; empty while a character is still incomplete."""
        self._recent.append(token_id)
        try:
            piece = self._stream.step(self._tokenizer, token_id)
        except Exception as err:  # tokenizers raises on prefixes it cannot re-decode
            log.debug("DecodeStream failed (%s); restarting it from recent tokens", err)
            piece = self._restart()
        if piece is not None:
            self._recent.clear()
        return piece or ""

    def _restart(self) -> str | None:
        """Decode the held tokens directly and start a fresh stream after them."""
        text = self._tokenizer.decode(self._recent, skip_special_tokens=True)
        self._stream = DecodeStream(ids=self._recent[-PROMPT_CONTEXT_TOKENS:], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return None
        return text
