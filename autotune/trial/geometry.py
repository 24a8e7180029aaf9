"""Model shape read from config.json: what the memory planner and the parallel-layout rules need."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serving.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ModelGeometry:
    """Sizes of a decoder-only transformer, enough to count weight and KV-cache bytes."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    model_type: str = ""
    """config.json's model_type: which families the engine can split into pipeline stages."""

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the lm_head (counted once when tied)."""
        copies = 1 if self.tied_embeddings else 2
        return copies * self.vocab_size * self.hidden_size

    @property
    def linear_params_per_layer(self) -> int:
        """Attention projections plus the gated MLP: the weights quantisation applies to."""
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        return q_and_o + k_and_v + mlp

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def num_params(self) -> int:
        return self.embedding_params + self.num_layers * self.linear_params_per_layer + self.norm_params

    def config_fields(self) -> dict[str, int | str]:
        """The config.json keys the serving side's layout check reads (validate_parallel)."""
        return {
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "num_hidden_layers": self.num_layers,
            "model_type": self.model_type,
        }

    def kv_bytes_per_token(self, bytes_per_element: float) -> float:
        """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element


def load_geometry(model: ModelConfig) -> ModelGeometry:
    """Read config.json of a local or shipped model; a hub id must be in a local directory first."""
    directory = model.resolve_path()
    if directory is None:
        raise ConfigError(
            f"model.path={model.path!r}: no local directory or shipped model of that name; "
            "download it first and give its directory"
        )
    path = directory / "config.json"
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"model.path={model.path!r}: {path} is missing") from None
    text = raw.get("text_config", raw)
    try:
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        return ModelGeometry(
            num_layers=int(text["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(text["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            vocab_size=int(text["vocab_size"]),
            tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
            model_type=str(text.get("model_type") or raw.get("model_type") or ""),
        )
    except KeyError as err:
        raise ConfigError(
            f"{path}: missing {err.args[0]!r}; the planner needs a Llama-style config"
        ) from None
