"""AsyncEngine: the LLMEngine step loop in a background thread, requests streamed through asyncio queues.

The thread owns the engine: requests and aborts reach it as commands, its outputs come back to the event
loop with call_soon_threadsafe, one batch per step. torch releases the GIL inside its kernels, so the event
loop (HTTP parsing, SSE writes) keeps running while a step computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

from prometheus_client import CollectorRegistry

from serving.engine.llm_engine import LLMEngine
from serving.engine.metrics import EngineMetrics
from serving.engine.output_streams import EngineDeadError, OutputStreams
from serving.engine.outputs import EngineStats, RequestOutput
from serving.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1
"""Longest sleep with no work; a new request wakes the loop at once."""
GATHER_WAIT_S = 0.0005
"""Shortest sleep while requests wait but nothing can run yet (a static batch still gathering)."""


class AsyncEngine(OutputStreams):
    """Thread-backed engine with an asyncio interface."""

    def __init__(self, engine: LLMEngine, *, tokenizer: Any = None, model_name: str = "model") -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.metrics = EngineMetrics()
        self.registry: CollectorRegistry = self.metrics.registry
        engine.register_metrics(self.registry)
        self._commands: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._observe(None)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() was already called")
        self._bind_loop()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the step loop; requests still in flight fail with EngineDeadError."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self.engine.close)
        self._fail_all(EngineDeadError("engine shut down"))

    def is_healthy(self) -> bool:
        """False once the step loop has died (or was shut down), or the engine reports a failure."""
        if self._error is not None or self._stopping or self.engine.failure() is not None:
            return False
        return self._thread is None or self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # --- requests ------------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream one RequestOutput per step that gives this request tokens; the last has finished=True.

        ValueError for a request the engine cannot run (empty, too long, duplicate id); closing the
        iterator early (client gone) aborts the request and frees its blocks.
        """
        if self._thread is None:
            raise RuntimeError("call AsyncEngine.start() before generate()")
        if not self.is_healthy():
            raise EngineDeadError(f"engine step loop is not running: {self._error!r}")
        self.engine.validate_request(prompt_token_ids, params)
        queue = self._open(request_id)
        self._submit(("add", request_id, list(prompt_token_ids), params, priority, self.engine.clock()))
        abandon = functools.partial(self._submit, ("abort", request_id))
        async with contextlib.aclosing(self._stream(request_id, queue, abandon)) as stream:
            async for item in stream:
                yield item

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its stream ends with finish_reason "abort"."""
        self._submit(("abort", request_id))

    def _submit(self, command: tuple[Any, ...]) -> None:
        self._commands.append(command)
        self._wake.set()

    # --- the step loop (engine thread) ---------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._wake.clear()
                self._apply_commands()
                if not engine.has_unfinished():
                    self._wake.wait(IDLE_WAIT_S)
                    continue
                outputs = engine.step()
                if engine.last_step_idle:  # a static batch still gathering: sleep until it is due
                    self._wake.wait(max(GATHER_WAIT_S, engine.scheduler.seconds_until_batch()))
                    continue
                self._observe(engine.last_step_seconds)  # before the outputs: a client sees fresh metrics
                if outputs:
                    self._post(self._dispatch, outputs)
        except BaseException as err:
            log.exception("engine step loop died")
            self._error = err
            self._post(self._fail_all, EngineDeadError(f"engine step loop died: {err!r}"))

    def _apply_commands(self) -> None:
        while self._commands:
            kind, request_id, *args = self._commands.popleft()
            if kind == "add":
                prompt, params, priority, arrival = args
                try:
                    self.engine.add_request(request_id, prompt, params, priority, arrival_time=arrival)
                except ValueError as err:
                    self._post(self._deliver, request_id, err)
            else:
                stop = self.engine.abort(request_id)
                if stop is not None:
                    self._observe(None)
                    self._post(self._deliver, request_id, stop)

    def _observe(self, step_seconds: float | None) -> None:
        e = self.engine
        totals = (e.num_prompt_tokens_total, e.num_generation_tokens_total)
        self.metrics.observe(e.stats(), *totals, step_seconds)
