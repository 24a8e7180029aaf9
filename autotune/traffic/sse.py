"""Incremental Server-Sent Events parsing: bytes in, complete `data:` payloads out."""

from __future__ import annotations


class SSEDecoder:
    """Splits a byte stream into SSE events and yields each event's data (multi-line data joined by \\n).

    Comments (lines starting with ':') and other fields (event:, id:, retry:) are skipped. Works on raw
    bytes so a multi-byte character split across reads is never decoded half-way.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        if b"\r" in self._buffer:
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
        events: list[str] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                break
            raw, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            data = self._data(raw)
            if data is not None:
                events.append(data)
        return events

    def flush(self) -> list[str]:
        """The last event when the stream ended without its blank line."""
        raw, self._buffer = self._buffer.strip(b"\n"), b""
        data = self._data(raw) if raw else None
        return [] if data is None else [data]

    @staticmethod
    def _data(raw: bytes) -> str | None:
        parts = []
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                parts.append(value[1:] if value.startswith(b" ") else value)
        if not parts:
            return None
        return b"\n".join(parts).decode("utf-8", errors="replace")
