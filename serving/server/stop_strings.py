"""Stop strings over streamed text: hold back just enough text that a stop string is never half-sent."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feeds text pieces in, hands back the text that is safe to send, and reports a matched stop string."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        self._stops = tuple(stops)
        self._include = include_stop
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""
        self._sent = 0
        self.matched: str | None = None

    def feed(self, piece: str) -> str:
        """Text that can be sent now. After a match, the text up to the stop string (or through it)."""
        if self.matched is not None:
            return ""
        searched_from = max(0, len(self._text) - self._hold)
        self._text += piece
        match = self._first_match(searched_from)
        if match is not None:
            index, stop = match
            self.matched = stop
            return self._release(index + len(stop) if self._include else index)
        if self._include or not self._stops:
            return self._release(len(self._text))
        return self._release(max(self._sent, len(self._text) - self._hold))

    def flush(self) -> str:
        """The held-back tail, once the output has ended without a match."""
        return "" if self.matched is not None else self._release(len(self._text))

    def _first_match(self, start: int) -> tuple[int, str] | None:
        found = [(i, s) for s in self._stops if (i := self._text.find(s, start)) >= 0]
        return min(found) if found else None

    def _release(self, end: int) -> str:
        piece = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return piece
