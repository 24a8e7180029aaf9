"""Our own Llama-family forward (as nano-vllm and gpt-fast write theirs): the lean step of the builtin engine.

Built from a loaded transformers LlamaForCausalLM (same weights, same dummy init, same local directories),
then the transformers model is dropped. What it does differently from transformers' forward:
- q/k/v are one fused Linear and gate/up another: two GEMMs fewer per layer, each weight read once;
- tokens stay flat [T, hidden] (no batch dimension, no transposes to [1, H, T, D] and back);
- RoPE reads a cos/sin table computed once at load (transformers recomputes it every step);
- the final norm and the lm_head run only on the rows whose logits are kept (sampled positions);
- no masks, caches or output dataclasses of the library: attention reads and writes the paged KV cache
  through the engine's attention functions (serving/engine/attention.py), chosen by config.attention.
The module tree keeps transformers' names (model.embed_tokens, model.layers, model.norm, lm_head) so the
pipeline stages (distributed/pipeline.py) cut it the same way. Tensor parallelism (DeepSpeed AutoTP) shards
transformers' unfused Linears by name, so tp > 1 keeps the transformers forward (see `lean_supported`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from serving.engine.attention import METADATA_KWARG, function_for

LEAN_ARCHITECTURES = frozenset({"LlamaForCausalLM"})
"""transformers classes whose forward this module reproduces (greedy-equality tests cover them)."""


@dataclass
class LeanOutput:
    """What the runner and the pipeline stages read: transformers' output field names."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm arithmetic (float32 statistics, cast back, then the weight)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose outputs are the parts' outputs concatenated (one GEMM, weights read once)."""
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    has_bias = parts[0].bias is not None
    fused = nn.Linear(
        weight.shape[1], weight.shape[0], bias=has_bias, dtype=weight.dtype, device=weight.device
    )
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)  # type: ignore[misc]
    return fused


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, D] by half-width cos/sin [T, 1, D/2]: transformers' rotate_half arithmetic."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LeanAttention(nn.Module):
    """Fused qkv projection, RoPE, paged attention (the engine's function), o_proj."""

    def __init__(self, hf: Any, layer_idx: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = int(hf.head_dim)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scaling = float(hf.scaling)
        self.qkv_proj = fused_linear(hf.q_proj, hf.k_proj, hf.v_proj)
        self.o_proj = hf.o_proj
        self.sizes = [num_heads * self.head_dim, num_kv_heads * self.head_dim, num_kv_heads * self.head_dim]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step | None
    ) -> torch.Tensor:
        """step None: inside the compiled graph, attention is the opaque op reading compiled.current_step."""
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = rope(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = rope(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if step is None:
            out = torch.ops.autotune.lean_attention(q, k, v, self.layer_idx, self.scaling)
        else:
            out = step.attend(self, q, k, v)  # [T, H, D]
        return self.o_proj(out.reshape(tokens, -1))


class LeanMLP(nn.Module):
    def __init__(self, hf: Any) -> None:
        super().__init__()
        self.gate_up_proj = fused_linear(hf.gate_proj, hf.up_proj)
        self.down_proj = hf.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class LeanDecoderLayer(nn.Module):
    def __init__(self, hf: Any, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        attn = hf.self_attn
        self.self_attn = LeanAttention(attn, attn.layer_idx, num_heads, num_kv_heads)
        self.mlp = LeanMLP(hf.mlp)
        self.input_layernorm = RMSNorm(hf.input_layernorm.weight, hf.input_layernorm.variance_epsilon)
        norm = hf.post_attention_layernorm
        self.post_attention_layernorm = RMSNorm(norm.weight, norm.variance_epsilon)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step | None
    ) -> torch.Tensor:
        """Positional arguments, hidden states first: a pipeline PassThrough stands in with that call."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, step)
        return h + self.mlp(self.post_attention_layernorm(h))


class Step:
    """The step's attention metadata and the attention function every layer calls."""

    def __init__(self, metadata: Any, attention: Any) -> None:
        self.metadata = metadata
        self.attention = attention

    def attend(self, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Views as [1, heads, T, D], as the attention functions take them from transformers (no copy)."""
        out, _ = self.attention(
            layer,
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            None,
            scaling=layer.scaling,
            **{METADATA_KWARG: self.metadata},
        )
        result: torch.Tensor = out[0]
        return result


class LeanDecoder(nn.Module):
    """Embedding, layers, final norm; called by the pipeline stages with input_ids or inputs_embeds."""

    def __init__(self, hf: Any, num_heads: int, num_kv_heads: int, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = hf.embed_tokens
        self.layers = nn.ModuleList([LeanDecoderLayer(layer, num_heads, num_kv_heads) for layer in hf.layers])
        self.norm: nn.Module = RMSNorm(hf.norm.weight, hf.norm.variance_epsilon)
        dtype = self.embed_tokens.weight.dtype
        positions = torch.arange(max_positions, device=self.embed_tokens.weight.device)[None]
        cos, sin = hf.rotary_emb(torch.empty((), dtype=dtype), positions)  # [1, P, D], halves repeated
        half = cos.shape[-1] // 2
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", cos[0, :, :half].contiguous(), persistent=False)
        self.register_buffer("sin", sin[0, :, :half].contiguous(), persistent=False)
        self.attention: Any = None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> LeanOutput:
        """Hidden states [1, T, hidden] after every layer this model holds and the final norm."""
        return LeanOutput(
            last_hidden_state=self.norm(
                self.layers_out(input_ids, position_ids, inputs_embeds, kwargs)
            ).unsqueeze(0)
        )

    def layers_out(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """[T, hidden] after the layers (no final norm): tokens embedded here unless hidden states came in."""
        if position_ids is None:
            raise ValueError("the lean forward needs position_ids (the runner passes them)")
        if inputs_embeds is not None:
            x = inputs_embeds[0]
        elif input_ids is not None:
            x = self.embed_tokens(input_ids[0])
        else:
            raise ValueError("the lean forward needs input_ids or inputs_embeds")
        return self.run_layers(x, position_ids[0], Step(kwargs.get(METADATA_KWARG), self.attention))

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, step: Step | None) -> torch.Tensor:
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        for layer in self.layers:
            x = layer(x, cos, sin, step)
        return x


class LeanLlama(nn.Module):
    """Drop-in for the transformers model under the runner: model(input_ids=, position_ids=,
    logits_to_keep=, paged_attention_metadata=).logits; the final norm and lm_head on kept rows only."""

    def __init__(self, hf: Any) -> None:
        super().__init__()
        self.config = hf.config
        self.generation_config = getattr(hf, "generation_config", None)
        attn = hf.model.layers[0].self_attn
        num_heads = attn.q_proj.weight.shape[0] // attn.head_dim
        num_kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
        self.model = LeanDecoder(hf.model, num_heads, num_kv_heads, int(hf.config.max_position_embeddings))
        self.lm_head: nn.Module = hf.lm_head
        self.compiled: Any = None
        """compiled.compile_forward(self.flat_forward) once compile() ran (model.compile: compiled)."""
        self.set_attn_implementation(hf.config._attn_implementation)

    def set_attn_implementation(self, name: str) -> None:
        """One of serving.engine.attention's registered names (autotune_paged, ...)."""
        self.model.attention = function_for(name)
        self.config._attn_implementation = name

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> LeanOutput:
        if self.compiled is not None and input_ids is not None and position_ids is not None:
            return LeanOutput(
                logits=self._run_compiled(input_ids[0], position_ids[0], logits_to_keep, kwargs)
            )
        x = self.model.layers_out(input_ids, position_ids, inputs_embeds, kwargs)
        if logits_to_keep is not None:
            x = x.index_select(0, logits_to_keep)
        return LeanOutput(logits=self.lm_head(self.model.norm(x)).unsqueeze(0))

    def flat_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Logits [K, V] of tokens [T] at positions [T] for kept rows [K]: what compiled mode compiles."""
        x = self.model.run_layers(self.model.embed_tokens(input_ids), positions, None)
        logits: torch.Tensor = self.lm_head(self.model.norm(x.index_select(0, keep)))
        return logits

    def compile(self, warmup_tokens: Sequence[int] = ()) -> None:  # type: ignore[override]
        """Compiled execution from now on (compiled.py); compile for these token counts right away."""
        from serving.engine.compiled import compile_forward

        self.compiled = compile_forward(self.flat_forward)
        device = self.model.embed_tokens.weight.device
        with torch.inference_mode():
            for n in warmup_tokens:  # distinct tensors: aliased inputs would compile another graph
                ids, positions = (torch.zeros(n, dtype=torch.long, device=device) for _ in range(2))
                self._run_compiled(ids, positions, torch.arange(n, device=device), {})

    def _run_compiled(
        self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        from serving.engine.compiled import bucket, current_step, padded

        if self.compiled is None:
            raise RuntimeError("compile() first")
        if keep is None:
            keep = torch.arange(ids.shape[0], device=ids.device)
        tokens, kept = bucket(ids.shape[0]), bucket(keep.shape[0])
        meta = kwargs.get(METADATA_KWARG)
        with current_step(None if meta is None else Step(meta, self.model.attention)):
            logits = self.compiled(padded(ids, tokens), padded(positions, tokens), padded(keep, kept))
        return logits[: keep.shape[0]].unsqueeze(0)


def lean_supported(hf_model: nn.Module, tp: int) -> str | None:
    """None when the lean forward can serve this model and layout, else why the transformers forward runs."""
    architectures = getattr(getattr(hf_model, "config", None), "architectures", None) or []
    name = type(hf_model).__name__
    if name not in LEAN_ARCHITECTURES:
        return f"{name} is not one of {sorted(LEAN_ARCHITECTURES)} ({architectures})"
    if tp > 1:
        return "parallel.tp > 1: DeepSpeed AutoTP shards transformers' unfused Linears by name"
    rope_type = (getattr(hf_model.config, "rope_parameters", None) or {}).get("rope_type", "default")
    if getattr(hf_model.config, "rope_scaling", None) and rope_type == "dynamic":
        return "dynamic RoPE scaling changes the table with the sequence length"
    return None
