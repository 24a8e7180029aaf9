"""OpenAI-compatible request bodies, checked before anything reaches the engine.

Unknown fields are rejected by name (`extra="forbid"`). Well-known OpenAI/vLLM fields this server
does not implement are accepted only at their neutral value (`repetition_penalty: 1.0`,
`top_k: null`, ...), because benchmark clients send them; any other value is a 400 naming the
field, never a silently different sampling. `n`, `best_of`, `logprobs`, `top_logprobs` and (for
completions) `echo` are implemented; `output_options()` checks them together. Metadata fields
(`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`) are accepted and ignored because
they change nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from serving.engine.sampling_params import MAX_LOGPROBS
from serving.server.errors import APIError

MAX_N = 128
"""Most choices (n, best_of) per request: each is an engine request."""


class OutputOptions(BaseModel):
    """What a response holds beyond one text, decided once per request."""

    model_config = ConfigDict(frozen=True)

    n: int = 1
    """Choices returned."""
    best_of: int = 1
    """Candidates generated; the n with the highest cumulative logprob are returned."""
    logprobs: int | None = None
    """Alternatives per token (completions' logprobs, chat's top_logprobs); None: no logprobs at all."""
    echo: bool = False
    """Completions: the prompt's text (and, with logprobs, its tokens' logprobs) starts every choice."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with `choices: []` and the request's usage (OpenAI semantics)."""
    continuous_usage_stats: bool = False
    """vLLM extension: usage in every chunk."""


class _GenerationRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    """Must equal the served model name when given."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Output tokens; defaults to what is left of max_model_len after the prompt."""
    temperature: float | None = Field(default=None, ge=0.0)
    """Default 1.0; 0 means greedy."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Default 1.0."""
    seed: int | None = None
    """Choice i of n uses seed + i, as vLLM does."""
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    """Stop strings: the output ends before the first occurrence (finish_reason `stop`)."""
    stop_token_ids: list[int] | None = None
    """vLLM extension: token ids that end the output."""
    include_stop_str_in_output: bool = False
    """vLLM extension: keep the matched stop string in the text."""
    ignore_eos: bool = False
    """vLLM extension: keep generating past EOS (benchmarks force output lengths with it)."""
    priority: int = 0
    """Extension: lower is served first when the scheduler's queue_order is `priority`."""
    return_tokens_as_token_ids: bool = False
    """vLLM extension: logprobs name tokens `token_id:<id>` (exact ids, whatever their text)."""
    # metadata: accepted, changes nothing
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # well-known sampling fields: only their neutral value is accepted
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    top_k: int | None = None
    min_p: float | None = 0.0
    min_tokens: int | None = 0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    use_beam_search: bool | None = False
    length_penalty: float | None = 1.0
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    truncate_prompt_tokens: int | None = None
    echo: bool | None = False

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "presence_penalty": (None, 0.0),
        "frequency_penalty": (None, 0.0),
        "repetition_penalty": (None, 1.0),
        "top_k": (None, -1, 0),
        "min_p": (None, 0.0),
        "min_tokens": (None, 0),
        "logit_bias": (None, {}),
        "use_beam_search": (None, False),
        "length_penalty": (None, 1.0),
        "skip_special_tokens": (None, True),
        "spaces_between_special_tokens": (None, True),
        "truncate_prompt_tokens": (None,),
        "echo": (None, False),
    }
    """Fields accepted only at these values: anything else would be silently ignored, so it is refused."""

    def check_supported(self) -> None:
        """Refuse a non-neutral value of a field this server does not implement, naming the field."""
        for name, allowed in self.NEUTRAL.items():
            value = getattr(self, name)
            if value not in allowed:
                shown = " or ".join(map(_json_repr, allowed))
                raise APIError(
                    f"{name}={_json_repr(value)} is not supported by this server; omit it or send {shown}",
                    param=name,
                    code="unsupported_value",
                )
        for i, stop in enumerate(self.stop_strings):
            if not stop:
                raise APIError(f"stop[{i}] is empty; remove it", param="stop", code="invalid_value")

    def _choices(self, num_logprobs: int | None, echo: bool, logprobs_param: str) -> OutputOptions:
        """n and best_of checked against each other, the sampling and streaming (messages as vLLM's)."""
        n = 1 if self.n is None else self.n
        best_of = n if self.best_of is None else self.best_of
        _in_range("n", n, 1, MAX_N)
        _in_range("best_of", best_of, 1, MAX_N)
        if best_of < n:
            raise APIError(f"best_of={best_of} must be >= n={n}", param="best_of", code="invalid_value")
        if best_of > 1 and self.temperature == 0:
            name = "n" if n > 1 else "best_of"
            raise APIError(
                f"{name} must be 1 when using greedy sampling (temperature=0), got {max(n, best_of)}",
                param=name,
                code="invalid_value",
            )
        if best_of > n and self.stream:
            raise APIError(
                f"best_of={best_of} > n={n} cannot stream (the best are known only at the end); "
                "drop stream or best_of",
                param="best_of",
                code="invalid_value",
            )
        if num_logprobs is not None:
            _in_range(logprobs_param, num_logprobs, 0, MAX_LOGPROBS)
        return OutputOptions(n=n, best_of=best_of, logprobs=num_logprobs, echo=echo)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. One prompt per request: text, token ids, or a one-element list of either."""

    prompt: str | list[int] | list[str] | list[list[int]]
    add_special_tokens: bool = True
    """vLLM extension: add BOS when tokenising a text prompt."""
    logprobs: int | None = None
    suffix: str | None = None

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **{k: v for k, v in _GenerationRequest.NEUTRAL.items() if k != "echo"},
        "suffix": (None, ""),
    }

    def output_options(self) -> OutputOptions:
        return self._choices(self.logprobs, bool(self.echo), "logprobs")

    def single_prompt(self) -> str | list[int]:
        """The one prompt in this request; batched prompts are refused by name."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if not prompt or isinstance(prompt[0], int):
            return cast(list[int], prompt)
        if len(prompt) != 1:
            raise APIError(
                f"prompt holds {len(prompt)} prompts; this server takes one prompt per request",
                param="prompt",
                code="unsupported_value",
            )
        return cast(str | list[int], prompt[0])


class ContentPart(_Strict):
    type: Literal["text"]
    """Only text parts: this server serves text models."""
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if isinstance(self.content, list):
            message["content"] = [part.model_dump() for part in self.content]
        elif self.content is None:
            message["content"] = ""
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions: the tokenizer's chat template turns messages into the prompt."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Takes precedence over max_tokens (as in OpenAI's API)."""
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    continue_final_message: bool | None = False

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_GenerationRequest.NEUTRAL,
        "tools": (None, []),
        "tool_choice": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
        "continue_final_message": (None, False),
    }

    def output_options(self) -> OutputOptions:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise APIError(
                f"top_logprobs={self.top_logprobs} needs logprobs=true",
                param="top_logprobs",
                code="invalid_value",
            )
        return self._choices((self.top_logprobs or 0) if self.logprobs else None, False, "top_logprobs")

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    """POST /tokenize: exactly the tokens a completion or chat request with this input would use."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    """For `prompt`: add BOS as /v1/completions does."""
    add_generation_prompt: bool = True
    """For `messages`: as /v1/chat/completions does."""
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Strict):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


def _in_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise APIError(f"{name}={value} is invalid: use {low} to {high}", param=name, code="invalid_value")


def _json_repr(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
