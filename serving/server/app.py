"""The OpenAI-compatible FastAPI app around one engine.

Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /tokenize, /detokenize, /metrics,
and the schema: /openapi.json, /docs.
Bodies are parsed by the protocol models (not FastAPI's body injection) so every bad input,
including malformed JSON, gets the same OpenAI-style 4xx body. The engine's lifecycle (start,
shutdown) belongs to the caller (serving.server.serve), not to this app.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.config import DeploymentConfig
from serving.engine.client import EngineClient
from serving.engine.output_streams import EngineDeadError
from serving.engine.sampling_params import SamplingParams
from serving.server import errors
from serving.server.admission import Admission, AdmissionMiddleware
from serving.server.auth import APIKeyMiddleware
from serving.server.choices import Choices
from serving.server.errors import APIError
from serving.server.generation import Completion, DeadlineExceeded, GenerationJob, TokenEvent
from serving.server.http_metrics import HTTPMetrics, HTTPMetricsMiddleware
from serving.server.logprob_format import TokenTexts
from serving.server.openapi import install_openapi
from serving.server.prompts import check_token_ids, encode_chat, encode_text, output_budget
from serving.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _GenerationRequest,
)
from serving.server.responses import DONE, ResponseIds, error_event, usage_chunk

ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/tokenize",
    "/detokenize",
    "/metrics",
    "/openapi.json",
    "/docs",
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Body = TypeVar("Body", bound=BaseModel)
T = TypeVar("T")


class ServerState:
    """What the routes share: the engine, its tokenizer and the HTTP metrics."""

    def __init__(self, engine: EngineClient, metrics: HTTPMetrics, config: DeploymentConfig) -> None:
        self.engine = engine
        self.request_timeout_s = config.server.request_timeout_s
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size = len(engine.tokenizer)
        self.texts = TokenTexts(engine.tokenizer)
        self.metrics = metrics
        self.created = int(time.time())

    def texts_for(self, req: _GenerationRequest) -> TokenTexts:
        return self.texts.as_ids() if req.return_tokens_as_token_ids else self.texts

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise errors.model_not_found(name, self.model_name)

    def check_healthy(self) -> None:
        if not self.engine.is_healthy():
            raise APIError(
                "The engine is not healthy; the server is going down", status=503, type="server_error"
            )

    def job(self, req: _GenerationRequest, prompt_ids: list[int], max_tokens: int | None) -> GenerationJob:
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        budget = output_budget(len(prompt_ids), max_tokens, self.max_model_len, param)
        check_token_ids(req.stop_token_ids or (), self.vocab_size, "stop_token_ids")
        try:
            params = SamplingParams(
                max_tokens=budget,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=req.seed,
                ignore_eos=req.ignore_eos,
                stop_token_ids=tuple(req.stop_token_ids or ()),
            )
        except ValueError as err:
            raise APIError(str(err), code="invalid_value") from None
        return GenerationJob(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            params=params,
            priority=req.priority,
            stop=req.stop_strings,
            include_stop=req.include_stop_str_in_output,
            deadline=None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s,
        )


def build_app(
    engine: EngineClient, config: DeploymentConfig | None = None, api_key: str | None = None
) -> FastAPI:
    """An app serving `engine`, which must already be started; `config` (default: the defaults) gives
    the server section's limits; with `api_key` /v1/* needs it as a bearer token."""
    config = config or DeploymentConfig()
    metrics = HTTPMetrics(ROUTES)
    state = ServerState(engine, metrics, config)
    app = FastAPI(title="serving", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    install_openapi(app)
    app.state.serving = state
    app.add_middleware(AdmissionMiddleware, admission=Admission.from_config(config, metrics.registry))
    if api_key is not None:  # outside admission: a request without the key takes no slot
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)
    app.add_exception_handler(APIError, errors.handle_api_error)
    app.add_exception_handler(StarletteHTTPException, errors.handle_http_exception)
    app.add_exception_handler(Exception, errors.handle_unexpected)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        _check_generation(state, req)
        options = req.output_options()
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            prompt_ids = encode_text(state.tokenizer, prompt, add_special_tokens=req.add_special_tokens)
        else:
            check_token_ids(prompt, state.vocab_size, "prompt")
            prompt_ids = list(prompt)
        job = state.job(req, prompt_ids, req.max_tokens)
        echo = (
            "" if not options.echo else prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt)
        )
        choices = Choices(options, job, state.texts_for(req), echo)
        ids = ResponseIds("cmpl", state.model_name)
        if req.stream:
            return _stream(state, _completion_chunks(state, choices, ids, req))
        return await _complete(request, state, choices, lambda dones: choices.completion_body(ids, dones))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        _check_generation(state, req)
        options = req.output_options()
        prompt_ids = encode_chat(
            state.tokenizer,
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            chat_template_kwargs=req.chat_template_kwargs,
        )
        choices = Choices(options, state.job(req, prompt_ids, req.output_limit), state.texts_for(req))
        ids = ResponseIds("chatcmpl", state.model_name)
        if req.stream:
            return _stream(state, _chat_chunks(state, choices, ids, req))
        return await _complete(request, state, choices, lambda dones: choices.chat_body(ids, dones))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "serving",
            "root": state.model_name,
            "parent": None,
            "max_model_len": state.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        state.check_healthy()
        return Response(status_code=200)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await _parse(request, TokenizeRequest)
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("Send exactly one of 'prompt' and 'messages'", param="prompt")
        if req.prompt is not None:
            tokens = encode_text(state.tokenizer, req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            assert req.messages is not None
            tokens = encode_chat(
                state.tokenizer,
                req.messages,
                add_generation_prompt=req.add_generation_prompt,
                chat_template_kwargs=req.chat_template_kwargs,
            )
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await _parse(request, DetokenizeRequest)
        state.check_model(req.model)
        check_token_ids(req.tokens, state.vocab_size, "tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        text = generate_latest(state.engine.registry) + metrics.render()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app


# --- request handling ----------------------------------------------------------------------------


async def _parse(request: Request, model: type[Body]) -> Body:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise errors.from_validation_error(err) from None


def _check_generation(state: ServerState, req: _GenerationRequest) -> None:
    state.check_model(req.model)
    req.check_supported()
    state.check_healthy()


async def _until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run `work` unless the client goes away first; then cancel it (which aborts the engine request)."""
    result: list[T] = []
    failure: list[BaseException] = []

    async with anyio.create_task_group() as group:

        async def run() -> None:
            try:
                result.append(await work())
            except Exception as err:  # re-raised below, outside the task group's ExceptionGroup
                failure.append(err)
            group.cancel_scope.cancel()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(watch)
    if failure:
        raise _as_api_error(failure[0])
    return result[0] if result else None


async def _complete(
    request: Request,
    state: ServerState,
    choices: Choices,
    body: Callable[[list[Completion]], dict[str, Any]],
) -> Response:
    """The whole completion as JSON (499 if the client goes away first), counted by how it finished."""
    dones = await _until_disconnect(request, lambda: choices.complete(state.engine))
    if dones is None:
        state.metrics.finished.labels("disconnect").inc()
        return Response(status_code=499)
    state.metrics.finished.labels(dones[0].finish_reason or "none").inc()
    return JSONResponse(body(dones))


def _as_api_error(err: BaseException) -> BaseException:
    """ValueError from the engine is a request it refused: a 400, not a 500."""
    if isinstance(err, ValueError) and not isinstance(err, APIError):
        return APIError(str(err), code="invalid_value")
    if isinstance(err, EngineDeadError):
        return APIError(f"The engine can no longer serve: {err}", status=503, type="server_error")
    if isinstance(err, DeadlineExceeded):
        return APIError(
            "The request did not finish within server.request_timeout_s and was aborted",
            status=504,
            type="timeout_error",
            code="request_timeout",
        )
    return err


# --- streaming ------------------------------------------------------------------------------------


def _stream(state: ServerState, chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(_guarded(state, chunks), media_type="text/event-stream", headers=SSE_HEADERS)


async def _guarded(state: ServerState, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Errors after the 200 went out become an error event and [DONE]; a disconnect is counted."""
    try:
        async for chunk in chunks:
            yield chunk
    except anyio.get_cancelled_exc_class():
        state.metrics.finished.labels("disconnect").inc()
        raise
    except Exception as err:
        api_err = _as_api_error(err)
        if not isinstance(api_err, APIError):
            api_err = APIError(f"{type(err).__name__}: {err}", status=500, type="server_error")
        yield error_event(api_err)
        yield DONE


async def _completion_chunks(
    state: ServerState, choices: Choices, ids: ResponseIds, req: CompletionRequest
) -> AsyncIterator[str]:
    last: dict[int, TokenEvent] = {}
    async for index, event in choices.events(state.engine):
        last[index] = event
        yield choices.completion_chunk(
            ids, index, event, usage=req.include_usage, continuous=req.continuous_usage
        )
    async for tail in _stream_end(state, choices.base, ids, "text_completion", req, last):
        yield tail


async def _chat_chunks(
    state: ServerState, choices: Choices, ids: ResponseIds, req: ChatCompletionRequest
) -> AsyncIterator[str]:
    last: dict[int, TokenEvent] = {}
    async for index, event in choices.events(state.engine):
        last[index] = event
        yield choices.chat_chunk(ids, index, event, usage=req.include_usage, continuous=req.continuous_usage)
    async for tail in _stream_end(state, choices.base, ids, "chat.completion.chunk", req, last):
        yield tail


async def _stream_end(
    state: ServerState,
    job: GenerationJob,
    ids: ResponseIds,
    obj: str,
    req: _GenerationRequest,
    last: dict[int, TokenEvent],
) -> AsyncIterator[str]:
    """Count how the stream finished (by its first choice), send the usage of every choice, then [DONE]."""
    first = last.get(0)
    state.metrics.finished.labels(first.finish_reason or "none" if first else "abort").inc()
    if req.include_usage:
        num_output = sum(event.num_output_tokens for event in last.values())
        yield usage_chunk(ids, obj, len(job.prompt_token_ids), num_output)
    yield DONE
