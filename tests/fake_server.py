"""A scripted OpenAI-compatible streaming server: tokens on a known schedule, failures on demand.

A test fixture (metrics checked against the schedule), also used by bench/ to measure the client alone.
Plain asyncio HTTP/1.1 with keep-alive and chunked SSE, so the server costs little CPU and can misbehave in
exactly the ways a real one does (status 500, hang, dropped stream, malformed SSE, error event).

    python tests/fake_server.py --port 0 --ttft-ms 20 --itl-ms 5 [--plan ok,http500,drop]

With --log, one JSON line per finished request gives its arrival and chunk write times (perf_counter, which
is CLOCK_MONOTONIC and so comparable with the client's in another process). It prints `LISTENING <port>`
once it accepts connections. Chunk k (0-based) of a request is written at t_request + ttft + k*itl
(absolute deadlines, so sleep errors do not add up). --plan cycles over requests in arrival order:
 ok | http500 | hang | drop | malformed | error_event | no_tokens | no_usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

BEHAVIOURS = ("ok", "http500", "hang", "drop", "malformed", "error_event", "no_tokens", "no_usage")


@dataclass(frozen=True)
class Script:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    plan: tuple[str, ...] = ("ok",)
    tokenize_extra: int | None = None
    """Serve /tokenize counting whitespace words plus this many (None: no /tokenize, as many servers)."""
    slots: int | None = None
    """Requests served at once; the rest wait in arrival order (None: no limit). With output n tokens the
    server carries slots / (ttft + (n - 1) * itl) req/s: beyond it the queue, and TTFT, grow without bound."""


class FakeServer:
    def __init__(self, script: Script, log: TextIO | None = None) -> None:
        self.script = script
        self.log = log
        self._plan: Iterator[str] = itertools.cycle(script.plan)
        self._slots = asyncio.Semaphore(script.slots) if script.slots else None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        arrived = time.perf_counter()
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if method == "GET" and path in ("/health", "/v1/models"):
            data = {"object": "list", "data": [{"id": "fake", "object": "model", "root": "fake"}]}
            await self._json(writer, 200, data if path == "/v1/models" else {})
            return True
        if method == "POST" and path == "/tokenize" and self.script.tokenize_extra is not None:
            request = json.loads(body)
            count = _words(request) + self.script.tokenize_extra
            await self._json(writer, 200, {"count": count, "max_model_len": 4096})
            return True
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            chat = path.endswith("chat/completions")
            if self._slots is None:
                return await self._stream(writer, json.loads(body), chat, arrived)
            async with self._slots:  # the token schedule starts when a slot frees: queueing shows in TTFT
                return await self._stream(writer, json.loads(body), chat, time.perf_counter())
        await self._json(writer, 404, {"error": {"message": f"no route {method} {path}"}})
        return True

    @staticmethod
    async def _json(writer: asyncio.StreamWriter, status: int, data: dict[str, Any]) -> None:
        payload = json.dumps(data).encode()
        head = (
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()

    async def _stream(
        self, writer: asyncio.StreamWriter, request: dict[str, Any], chat: bool, t0: float
    ) -> bool:
        behaviour = next(self._plan)
        if behaviour == "http500":
            await self._json(writer, 500, {"error": {"message": "scripted failure"}})
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        if behaviour == "hang":
            await asyncio.sleep(3600)
        n = int(request.get("max_tokens") or 16)
        prompt_tokens = _words(request) + (self.script.tokenize_extra or 0)
        sent: list[float] = []
        for k in range(0 if behaviour == "no_tokens" else n):
            delay = t0 + self.script.ttft_s + k * self.script.itl_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if behaviour == "drop" and k == n // 2:
                writer.transport.abort()  # mid-stream, without the terminating chunk
                return False
            if behaviour == "malformed" and k == n // 2:
                self._event(writer, "{not json")
            elif behaviour == "error_event" and k == n // 2:
                self._event(writer, json.dumps({"error": {"message": "scripted error event", "code": 500}}))
            else:
                delta = {"delta": {"content": "x"}} if chat else {"text": "x"}
                self._event(writer, json.dumps({"choices": [{"index": 0, **delta, "finish_reason": None}]}))
                sent.append(time.perf_counter())
            await writer.drain()
        if behaviour != "no_usage" and request.get("stream_options", {}).get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            }
            self._event(writer, json.dumps({"choices": [], "usage": usage}))
        self._event(writer, "[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        self._log_request(behaviour, t0, sent)
        return True

    def _log_request(self, behaviour: str, arrived: float, sent: list[float]) -> None:
        """One JSON line per finished request: when it arrived and when each chunk was written."""
        if self.log is not None:
            self.log.write(json.dumps({"behaviour": behaviour, "t_arrived": arrived, "t_sent": sent}) + "\n")
            self.log.flush()

    @staticmethod
    def _event(writer: asyncio.StreamWriter, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")


def _words(request: dict[str, Any]) -> int:
    prompt = request.get("prompt") or " ".join(m["content"] for m in request.get("messages", []))
    return len(str(prompt).split())


@contextlib.contextmanager
def fake_server(
    ttft_ms: float = 0.0,
    itl_ms: float = 0.0,
    plan: str = "ok",
    *,
    log: Path | None = None,
    tokenize_extra: int | None = None,
    slots: int | None = None,
    cpus: str | None = None,
) -> Iterator[str]:
    """Run the server in its own process group; yields its URL and ends the group on exit."""
    with fake_server_process(
        ttft_ms, itl_ms, plan, log=log, tokenize_extra=tokenize_extra, slots=slots, cpus=cpus
    ) as (url, _):
        yield url


@contextlib.contextmanager
def fake_server_process(
    ttft_ms: float = 0.0,
    itl_ms: float = 0.0,
    plan: str = "ok",
    *,
    log: Path | None = None,
    tokenize_extra: int | None = None,
    slots: int | None = None,
    cpus: str | None = None,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """fake_server yielding (URL, the process leading its group), for tests that kill or stop it."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--ttft-ms",
        str(ttft_ms),
        "--itl-ms",
        str(itl_ms),
        "--plan",
        plan,
    ]
    command += ["--log", str(log)] if log is not None else []
    command += ["--tokenize-extra", str(tokenize_extra)] if tokenize_extra is not None else []
    command += ["--slots", str(slots)] if slots is not None else []
    command = ["taskset", "-c", cpus, *command] if cpus else command
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING"):
            raise RuntimeError(f"fake server did not start (exit {proc.wait(5)}): {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def serve(script: Script, host: str, port: int, log: TextIO | None = None) -> None:
    server = await asyncio.start_server(FakeServer(script, log).handle, host, port, backlog=4096)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--tokenize-extra", type=int, default=None, help="serve /tokenize: words + this")
    parser.add_argument("--slots", type=int, default=None, help="requests served at once (FIFO queue)")
    parser.add_argument("--log", help="write one JSON line per request: t_arrived, t_sent per chunk")
    parser.add_argument("--plan", default="ok", help=f"comma-separated, cycled: {', '.join(BEHAVIOURS)}")
    args = parser.parse_args(argv)
    plan = tuple(args.plan.split(","))
    unknown = sorted(set(plan) - set(BEHAVIOURS))
    if unknown:
        parser.error(f"--plan has unknown behaviour(s) {unknown}; choose from {list(BEHAVIOURS)}")
    script = Script(args.ttft_ms / 1000.0, args.itl_ms / 1000.0, plan, args.tokenize_extra, args.slots)
    log = open(args.log, "a") if args.log else None  # noqa: SIM115 (open for the process lifetime)
    try:
        import uvloop

        uvloop.run(serve(script, args.host, args.port, log))
    except ImportError:
        asyncio.run(serve(script, args.host, args.port, log))


if __name__ == "__main__":
    main()
