"""Per-request sampling settings, checked when the request arrives so the step loop never sees bad values."""

from __future__ import annotations

import math
from dataclasses import dataclass

GREEDY_BELOW = 1e-5
"""A temperature or top_p under this samples greedily (as vLLM's _SAMPLING_EPS for temperature), which
is what either means in the limit: logits divided by 1e-320 are inf (softmax NaN), and a top_p that
float32 rounds to 0 masks every token; either distribution would kill the step loop for the batch."""

MAX_LOGPROBS = 20
"""Most alternatives per token (OpenAI's top_logprobs limit, vLLM's default max_logprobs)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_tokens: int
    """Most tokens to generate (the output may stop earlier on eos, a stop id or max_model_len)."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of this request's own generator, so a seeded request repeats whatever else runs."""
    ignore_eos: bool = False
    """Keep generating past eos (benchmarks force output lengths with it)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end the request (finish_reason "stop")."""
    logprobs: int | None = None
    """Log-probability of each output token plus this many alternatives (0: only the token's); None: none."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (what `echo` with `logprobs` returns)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} is invalid: use at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(
                f"temperature={self.temperature} is invalid: use a finite value >= 0 (0 is greedy)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is invalid: use a value in (0, 1]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name}={value} is invalid: use 0 to {MAX_LOGPROBS} alternatives")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_p < GREEDY_BELOW
