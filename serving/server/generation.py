"""One request through the engine: token ids in, one event per generated token out.

The engine may hand back several tokens in one step; the client still gets one event (one SSE
chunk) per token, because benchmarks count inter-token latency per chunk. Stop strings end the
request here and abort it in the engine; so does a client that goes away (cancellation), so its KV
blocks are freed at once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import anyio

from serving.engine.client import EngineClient
from serving.engine.outputs import RequestOutput, TokenLogprob
from serving.engine.sampling_params import SamplingParams
from serving.server.detokenizer import IncrementalDetokenizer, backend_tokenizer
from serving.server.stop_strings import StopStringMatcher


@dataclass(frozen=True)
class GenerationJob:
    """A validated request, ready for the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    deadline: float | None = None
    """time.monotonic() by which the request must finish (server.request_timeout_s), or None."""


class DeadlineExceeded(TimeoutError):
    """The request ran past its deadline; it was aborted in the engine."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as the client sees it."""

    text: str
    """Text completed by this token (may be empty: a partial character or a held-back stop prefix)."""
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    """`stop`, `length` or `abort` on the last event, else None."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the output (vLLM's field)."""
    logprob: TokenLogprob | None = None
    """This token's logprob when the request asked for them (None on a token-less final event)."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """On the first event when the request asked for prompt logprobs: prompt tokens 1.."""


@dataclass(frozen=True)
class Completion:
    """A whole non-streamed output."""

    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per output token when the request asked for logprobs."""
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def cumulative_logprob(self) -> float:
        """Sum of the output tokens' logprobs: what best_of ranks candidates by."""
        return sum(lp.logprob for lp in self.logprobs)


async def generate_events(engine: EngineClient, job: GenerationJob) -> AsyncGenerator[TokenEvent, None]:
    """Events for every output token; the request is aborted in the engine unless it finished there."""
    state = _Decoder(engine, job)
    finished_in_engine = False
    outputs = engine.generate(job.request_id, job.prompt_token_ids, job.params, job.priority)
    try:
        while True:
            try:
                output = await _next_before(outputs, job.deadline)
            except StopAsyncIteration:
                break
            finished_in_engine = output.finished
            for event in state.events(output):
                yield event
                if event.finish_reason is not None:
                    return
    finally:
        with anyio.CancelScope(shield=True):
            close = getattr(outputs, "aclose", None)
            if close is not None:
                await close()
            if not finished_in_engine:
                await engine.abort(job.request_id)


async def _next_before(outputs: AsyncIterator[RequestOutput], deadline: float | None) -> RequestOutput:
    """The next output, or DeadlineExceeded once `deadline` passes (the cancel scope spans no yield)."""
    if deadline is None:
        return await anext(outputs)
    try:
        with anyio.fail_after(max(0.0, deadline - time.monotonic())):
            return await anext(outputs)
    except TimeoutError:
        raise DeadlineExceeded("the request ran past its deadline") from None


async def generate_completion(engine: EngineClient, job: GenerationJob) -> Completion:
    """Run a request to its end and join the text."""
    pieces: list[str] = []
    logprobs: list[TokenLogprob] = []
    prompt_logprobs: list[TokenLogprob] | None = None
    last: TokenEvent | None = None
    async for event in generate_events(engine, job):
        pieces.append(event.text)
        if event.logprob is not None:
            logprobs.append(event.logprob)
        if event.prompt_logprobs is not None:
            prompt_logprobs = event.prompt_logprobs
        last = event
    if last is None:  # the engine ended the stream without a final output
        return Completion("", "abort", None, len(job.prompt_token_ids), 0)
    return Completion(
        "".join(pieces),
        last.finish_reason,
        last.stop_reason,
        last.num_prompt_tokens,
        last.num_output_tokens,
        logprobs,
        prompt_logprobs,
    )


class _Decoder:
    """Per-request text state: incremental detokeniser plus stop-string matcher."""

    def __init__(self, engine: EngineClient, job: GenerationJob) -> None:
        self._job = job
        self._detok = IncrementalDetokenizer(backend_tokenizer(engine.tokenizer), job.prompt_token_ids)
        self._stops = StopStringMatcher(job.stop, job.include_stop)
        self._count = 0

    def events(self, output: RequestOutput) -> list[TokenEvent]:
        ids = output.new_token_ids
        events: list[TokenEvent] = []
        for k, token_id in enumerate(ids):
            self._count += 1
            last = output.finished and k == len(ids) - 1
            event = self._event(token_id, output, last)
            logprob = output.new_logprobs[k] if output.new_logprobs else None
            prompt = output.prompt_logprobs if k == 0 else None
            if logprob is not None or prompt is not None:
                event = dataclasses.replace(event, logprob=logprob, prompt_logprobs=prompt)
            events.append(event)
            if event.finish_reason is not None:
                return events
        if output.finished and not ids:  # e.g. aborted before any new token
            events.append(self._final("", output, None))
        return events

    def _event(self, token_id: int, output: RequestOutput, last: bool) -> TokenEvent:
        is_stop_token = (
            last and output.finish_reason == "stop" and token_id in self._job.params.stop_token_ids
        )
        piece = "" if is_stop_token and not self._job.include_stop else self._detok.step(token_id)
        text = self._stops.feed(piece)
        if self._stops.matched is not None:
            return TokenEvent(
                text,
                output.num_prompt_tokens,
                self._count,
                finish_reason="stop",
                stop_reason=self._stops.matched,
            )
        if last:
            return self._final(text, output, token_id if is_stop_token else None)
        return TokenEvent(text, output.num_prompt_tokens, self._count)

    def _final(self, text: str, output: RequestOutput, stop_reason: int | None) -> TokenEvent:
        return TokenEvent(
            text + self._stops.flush(),
            output.num_prompt_tokens,
            self._count,
            finish_reason=output.finish_reason or "stop",
            stop_reason=stop_reason,
        )
