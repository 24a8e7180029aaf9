"""The lean Llama (llama.py) from a model directory without transformers' model classes, or from a loaded
transformers model when the directory needs the library (RoPE scalings we do not reproduce).

Reading config.json and the weights ourselves keeps transformers' modelling import (~2.5 s of CPU of
start-up on this kind of machine, plus torch._dynamo it pulls in) out of the engine's start-up. Dummy
weights are drawn by dummy_weights.draw_dummy, as for transformers' model (the same
parameter names in the same order, float32 on the CPU from a generator seeded by model.seed, then cast), so
both forwards serve the same model: the greedy-equality tests compare them against transformers' generate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from serving.config import ConfigError, DeploymentConfig
from serving.engine.dummy_weights import draw_dummy
from serving.engine.llama import LeanLlama, LlamaSpec

LEAN_ARCHITECTURES = frozenset({"LlamaForCausalLM"})
"""transformers classes whose forward llama.py reproduces (the greedy-equality tests cover them)."""

log = logging.getLogger(__name__)


def lean_problem(hf: dict[str, Any]) -> str | None:
    """None when the lean forward serves this config.json, else why transformers' forward runs."""
    architectures = hf.get("architectures") or []
    if list(architectures) != ["LlamaForCausalLM"]:
        return f"architectures={architectures} is not one of {sorted(LEAN_ARCHITECTURES)}"
    if hf.get("hidden_act", "silu") != "silu" or hf.get("pretraining_tp", 1) != 1:
        return "hidden_act other than silu or pretraining_tp > 1"
    return None


def rope_problem(hf: dict[str, Any]) -> str | None:
    """The direct build computes only the default RoPE table; other types come from transformers' code."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    return None if kind == "default" else f"rope_type={kind!r}"


def spec_from_config(hf: dict[str, Any]) -> LlamaSpec:
    heads = int(hf["num_attention_heads"])
    return LlamaSpec(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def default_rope(hf: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [positions, head_dim] in float32, transformers' default RoPE arithmetic step by step."""
    theta = float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    positions = torch.arange(int(hf.get("max_position_embeddings", 2048)))[None]
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[0]
    return emb.cos() * 1.0, emb.sin() * 1.0


def load_lean_direct(config: DeploymentConfig, directory: Path, hf: dict[str, Any]) -> LeanLlama | None:
    """float32 CPU model with its weights (dummy or read), or None when transformers must build it."""
    reason = lean_problem(hf) or rope_problem(hf)
    if reason is None and config.model.load_format == "auto" and not any(directory.glob("*.safetensors")):
        reason = "the checkpoint is not in safetensors files"
    if reason is not None:
        log.info("model built by transformers: %s", reason)
        return None
    spec = spec_from_config(hf)
    model = LeanLlama(spec, _generation_config(directory, hf), device="meta")
    model.to_empty(device="cpu")
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    views = model.hf_parameters()
    with torch.no_grad():
        if config.model.load_format == "dummy":
            draw_dummy(views, config.model.seed)
        else:
            _read_weights(directory, views)
    model.model.set_rope(*default_rope(hf, spec.head_dim))
    return model


def from_transformers(hf_model: Any) -> LeanLlama:
    """The lean model holding a loaded transformers Llama's weights (its rotary table included)."""
    hf_config = hf_model.config
    spec = spec_from_config(hf_config.to_dict())
    model = LeanLlama(spec, getattr(hf_model, "generation_config", None), device="meta")
    first = next(hf_model.parameters())
    model.to_empty(device=first.device)
    nn.Module.to(model, dtype=first.dtype)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    views = model.hf_parameters()
    with torch.no_grad():
        for name, tensor in hf_model.state_dict().items():
            if name in views:
                views[name].copy_(tensor)
        positions = torch.arange(int(hf_config.max_position_embeddings), device=first.device)[None]
        cos, sin = hf_model.model.rotary_emb(torch.empty((), dtype=first.dtype), positions)  # type: ignore[operator, union-attr]
    model.model.set_rope(cos[0], sin[0])
    model.set_attn_implementation(hf_config._attn_implementation)
    return model


def _read_weights(directory: Path, views: dict[str, torch.Tensor]) -> None:
    from safetensors import safe_open

    missing = set(views)
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in views:
                    views[name].copy_(f.get_tensor(name))
                    missing.discard(name)
    if missing:
        raise ConfigError(f"model.path={directory}: the checkpoint lacks {sorted(missing)[:5]}")


def _generation_config(directory: Path, hf: dict[str, Any]) -> SimpleNamespace:
    """eos ids as transformers would find them: generation_config.json, else config.json."""
    path = directory / "generation_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    return SimpleNamespace(eos_token_id=data.get("eos_token_id", hf.get("eos_token_id")))
