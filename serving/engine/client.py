"""What the HTTP layer needs from an engine: the AsyncEngine contract, as a Protocol mypy checks.

It lives in the engine, not the server: the engine factory returns it (AsyncEngine, DataParallelEngine)
and the server consumes it, so neither package has to import the other's internals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from serving.engine.outputs import EngineStats, RequestOutput
from serving.engine.sampling_params import SamplingParams


class EngineClient(Protocol):
    tokenizer: Any
    model_name: str
    max_model_len: int
    registry: CollectorRegistry

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...
