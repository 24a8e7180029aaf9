"""Dotted keys (`scheduler.max_num_seqs`): the flat form of nested configs, and "did you mean" hints."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import Any


def flatten(node: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings as dotted keys to leaf values ({"a": {"b": 1}} -> {"a.b": 1})."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", node)
    return flat


def closest_key(key: str, known: typing.Iterable[str]) -> str | None:
    """The known key a misspelled `key` most likely meant, for "did you mean" hints (None: none close)."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return close[0] if close else None


def unknown_key_message(key: str, known: typing.Iterable[str]) -> str:
    close = closest_key(key, known)
    hint = f"; did you mean {close!r}?" if close else ""
    return f"unknown key {key!r}{hint} (known: {', '.join(sorted(known))})"
