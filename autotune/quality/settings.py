"""The `quality` section of the run config: the probe, the reference, and the bounds that make a trial
infeasible (conf/quality/default.yaml holds the documented defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.config import ConfigError

FULL_PRECISION: dict[str, Any] = {"precision.dtype": "float32", "precision.quantization": "none"}
"""The default reference: the study's base deployment at full precision."""


@dataclass
class QualitySettings:
    enabled: bool = True
    """Probe every trial (through the OpenAI API, so any backend) and score it against the reference."""
    num_prompts: int = 8
    """Probe prompts, drawn from the study's workload with `seed` (the same every trial)."""
    max_prompt_tokens: int = 96
    """Probe prompts are cut to their first tokens: the probe costs seconds, not a benchmark."""
    max_tokens: int = 16
    """Greedy continuation length the reference generates and every trial is scored on."""
    top_logprobs: int = 5
    """Alternatives per position for the KL estimate (1-20)."""
    seed: int = 1234
    reference: dict[str, Any] = field(default_factory=lambda: dict(FULL_PRECISION))
    """Deployment overrides (dotted keys) on the study's base deployment that make the reference."""
    reference_url: str | None = None
    """A running OpenAI-compatible server to use as the reference instead (it must serve the same
    tokenizer and support echo with logprobs); `reference` is then ignored."""
    min_token_agreement: float | None = 0.9
    """Infeasible below this share of continuation positions where the trial's top token is the
    reference's greedy token (null: report only)."""
    max_mean_kl: float | None = 0.05
    """Infeasible above this mean KL(reference || trial) in nats per position (null: report only)."""
    max_perplexity_ratio: float | None = 1.05
    """Infeasible when the trial's perplexity of the reference's continuations exceeds the reference's
    own by this factor (real checkpoints only; null: report only)."""
    enforce_on_dummy_weights: bool = False
    """Dummy (random) weights make every quality number synthetic: by default they are measured and
    reported but bound nothing."""

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_prompt_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quality.{name}={getattr(self, name)} is invalid: use 1 or more")
        if not 1 <= self.top_logprobs <= 20:
            raise ConfigError(f"quality.top_logprobs={self.top_logprobs} is invalid: use 1 to 20")
        if self.min_token_agreement is not None and not 0 <= self.min_token_agreement <= 1:
            raise ConfigError(
                f"quality.min_token_agreement={self.min_token_agreement} is invalid: use 0..1 or null"
            )
        for name in ("max_mean_kl", "max_perplexity_ratio"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"quality.{name}={value} is invalid: use >= 0 or null")

    def bounds(self, *, synthetic: bool) -> list[tuple[str, str, float]]:
        """Active bounds as (metric, 'max' | 'min', bound), as objectives.constraints gives them."""
        if not self.enabled or (synthetic and not self.enforce_on_dummy_weights):
            return []
        out = []
        if self.min_token_agreement is not None:
            out.append(("quality_token_agreement", "min", float(self.min_token_agreement)))
        if self.max_mean_kl is not None:
            out.append(("quality_mean_kl", "max", float(self.max_mean_kl)))
        if self.max_perplexity_ratio is not None and not synthetic:
            out.append(("quality_perplexity_ratio", "max", float(self.max_perplexity_ratio)))
        return out
