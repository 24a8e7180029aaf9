"""A request's choices: n (or best_of) engine requests, run together, rendered with logprobs and echo.

Choice i is its own engine request with seed + i (vLLM's rule), so a seeded request with n choices
repeats. best_of > n generates best_of candidates and returns the n with the highest cumulative logprob
(OpenAI's rule; not streamable); usage counts every generated token. Streams interleave the choices'
chunks as their tokens arrive, each chunk naming its choice's index. n = 1 takes the same path as
before, with no merging.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from serving.engine.client import EngineClient
from serving.engine.outputs import TokenLogprob
from serving.server.generation import (
    Completion,
    GenerationJob,
    TokenEvent,
    generate_completion,
    generate_events,
)
from serving.server.logprob_format import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    prompt_positions,
    vllm_prompt_logprobs,
)
from serving.server.protocol import OutputOptions
from serving.server.responses import (
    ResponseIds,
    chat_choice,
    chat_chunk,
    choices_body,
    completion_choice,
    completion_chunk,
    usage_of,
)


@dataclass
class Choices:
    """One request's choices: the engine jobs and how their outputs are shown."""

    options: OutputOptions
    base: GenerationJob
    texts: TokenTexts
    echo_text: str = ""
    """Completions with echo: the prompt's text, put before every choice's output."""
    jobs: list[GenerationJob] = field(init=False)
    _started: set[int] = field(init=False, default_factory=set)
    """Streamed choices whose first chunk went out (it carries the echo and the chat role)."""
    _offsets: dict[int, int] = field(init=False, default_factory=dict)
    """Streamed completions' text_offset per choice, continued across chunks."""

    def __post_init__(self) -> None:
        opts = self.options
        count = max(opts.n, opts.best_of)
        logprobs = opts.logprobs if opts.logprobs is not None else (0 if opts.best_of > opts.n else None)
        prompt_logprobs = opts.logprobs if opts.echo else None
        params = dataclasses.replace(self.base.params, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        seed = params.seed
        self.jobs = [
            dataclasses.replace(
                self.base,
                request_id=self.base.request_id if count == 1 else f"{self.base.request_id}-{i}",
                params=params if seed is None or i == 0 else dataclasses.replace(params, seed=seed + i),
            )
            for i in range(count)
        ]

    # --- not streamed ----------------------------------------------------------------------------

    async def complete(self, engine: EngineClient) -> list[Completion]:
        """Every job to its end, concurrently; cancelling this aborts them all."""
        if len(self.jobs) == 1:
            return [await generate_completion(engine, self.jobs[0])]
        return list(await asyncio.gather(*(generate_completion(engine, job) for job in self.jobs)))

    def returned(self, dones: list[Completion]) -> list[Completion]:
        """The n choices shown: all of them, or the best n of best_of by cumulative logprob."""
        if len(dones) == self.options.n:
            return dones
        return sorted(dones, key=lambda d: d.cumulative_logprob, reverse=True)[: self.options.n]

    def completion_body(self, ids: ResponseIds, dones: list[Completion]) -> dict[str, Any]:
        choices = []
        for i, done in enumerate(self.returned(dones)):
            logprobs, echoed = None, None
            if self.options.logprobs is not None:
                positions = self._echo_positions(done.prompt_logprobs) + _output_positions(done.logprobs)
                logprobs, _ = completion_logprobs(self.texts, positions, 0)
                if self.options.echo and done.prompt_logprobs is not None:
                    echoed = vllm_prompt_logprobs(self.texts, done.prompt_logprobs)
            choices.append(completion_choice(i, self.echo_text + done.text, done, logprobs, echoed))
        return choices_body(ids, "text_completion", choices, usage_of(dones))

    def chat_body(self, ids: ResponseIds, dones: list[Completion]) -> dict[str, Any]:
        choices = [
            chat_choice(i, done, self._chat_logprobs(done.logprobs))
            for i, done in enumerate(self.returned(dones))
        ]
        return choices_body(ids, "chat.completion", choices, usage_of(dones))

    # --- streamed --------------------------------------------------------------------------------

    async def events(self, engine: EngineClient) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) as tokens arrive; closing this aborts every unfinished choice."""
        if len(self.jobs) == 1:
            async with contextlib.aclosing(generate_events(engine, self.jobs[0])) as events:
                async for event in events:
                    yield 0, event
            return
        async for item in _merged([generate_events(engine, job) for job in self.jobs]):
            yield item

    def completion_chunk(
        self, ids: ResponseIds, index: int, event: TokenEvent, *, usage: bool, continuous: bool
    ) -> str:
        first = index not in self._started
        self._started.add(index)
        logprobs = None
        if self.options.logprobs is not None:
            positions = self._echo_positions(event.prompt_logprobs) if first else []
            positions += _output_positions([event.logprob] if event.logprob else [])
            logprobs, self._offsets[index] = completion_logprobs(
                self.texts, positions, self._offsets.get(index, 0)
            )
        text = self.echo_text + event.text if first else None
        return completion_chunk(
            ids, event, with_usage=usage, continuous=continuous, index=index, text=text, logprobs=logprobs
        )

    def chat_chunk(
        self, ids: ResponseIds, index: int, event: TokenEvent, *, usage: bool, continuous: bool
    ) -> str:
        first = index not in self._started
        self._started.add(index)
        logprobs = self._chat_logprobs([event.logprob] if event.logprob else [])
        return chat_chunk(
            ids, event, first=first, with_usage=usage, continuous=continuous, index=index, logprobs=logprobs
        )

    def _echo_positions(
        self, prompt_logprobs: list[TokenLogprob] | None
    ) -> list[tuple[int, TokenLogprob | None]]:
        if not self.options.echo or prompt_logprobs is None:
            return []
        return prompt_positions(self.base.prompt_token_ids, prompt_logprobs)

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
        return None if self.options.logprobs is None else chat_logprobs(self.texts, logprobs)


def _output_positions(logprobs: list[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
    return [(lp.token_id, lp) for lp in logprobs]


async def _merged(streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Interleave several event streams as their items arrive (each stream's own order kept)."""
    pending: dict[asyncio.Task[TokenEvent], int] = {}

    def advance(i: int) -> None:
        pending[asyncio.create_task(_next(streams[i]))] = i

    for i in range(len(streams)):
        advance(i)
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                try:
                    event = future.result()
                except StopAsyncIteration:
                    continue
                yield i, event
                advance(i)
    finally:
        for task in pending:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await _close(list(pending), streams)


async def _next(stream: AsyncIterator[TokenEvent]) -> TokenEvent:
    return await anext(stream)


async def _close(futures: list[asyncio.Task[TokenEvent]], streams: list[AsyncIterator[TokenEvent]]) -> None:
    """Let cancelled steps finish (their generators abort the engine requests), then close every stream."""
    await asyncio.gather(*futures, return_exceptions=True)
    for stream in streams:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
