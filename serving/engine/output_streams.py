"""OutputStreams: per-request asyncio queues fed from threads, what every EngineClient front end shares.

The step loop (AsyncEngine's engine thread) or the pipe readers (DataParallelEngine's replica threads)
produce RequestOutputs off the event loop; they hand them over with call_soon_threadsafe, and each
request's generate() drains its own queue. An exception put in a queue ends that request's stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from serving.engine.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine stopped (its step loop crashed, a replica died, or it was shut down)."""


class OutputStreams:
    """Mixin: call _bind_loop() from the event loop before streaming; generate() uses _stream()."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}

    def _bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()

    def _open(self, request_id: str) -> asyncio.Queue[RequestOutput | BaseException]:
        """A fresh queue for request_id; ValueError when that id is still streaming."""
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already running: use a unique id")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    async def _stream(
        self,
        request_id: str,
        queue: asyncio.Queue[RequestOutput | BaseException],
        abandon: Callable[[], None],
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's outputs until one is finished; `abandon` runs if the consumer leaves first."""
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped the request
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                abandon()

    # --- called from other threads -------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # --- event-loop side -----------------------------------------------------------------------

    def _dispatch(self, outputs: Sequence[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _fail_all(self, err: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(err)
