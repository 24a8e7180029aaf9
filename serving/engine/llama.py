"""Our own Llama-family forward (as nano-vllm and gpt-fast write theirs): the lean step of the builtin engine.

Built from config.json and the checkpoint directly, or from a loaded transformers model (llama_loader.py):
same weights, same dummy init, same local directories. What it does differently from transformers' forward:
- q/k/v are one fused Linear and gate/up another: two GEMMs fewer per layer, each weight read once;
- tokens stay flat [T, hidden] (no batch dimension, no transposes to [1, H, T, D] and back);
- RoPE reads a cos/sin table computed once at load (transformers recomputes it every step);
- the final norm and the lm_head run only on the rows whose logits are kept (sampled positions);
- no masks, caches or output dataclasses of the library: attention reads and writes the paged KV cache
  through the engine's attention functions (serving/engine/attention.py), chosen by config.attention.
The module tree keeps transformers' names (model.embed_tokens, model.layers, model.norm, lm_head) so the
pipeline stages (distributed/pipeline.py) cut it the same way; tensor parallelism shards it with
distributed/lean_tp.py (DeepSpeed AutoTP still shards a transformers model that llama_loader.py leaves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from serving.engine.attention import METADATA_KWARG, function_for

Device = torch.device | str | None


@dataclass(frozen=True)
class LlamaSpec:
    """The shapes of a Llama-family checkpoint (config.json's fields)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False


@dataclass
class LeanOutput:
    """What the runner and the pipeline stages read: transformers' output field names."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm arithmetic (float32 statistics, cast back, then the weight)."""

    def __init__(self, size: int, eps: float, device: Device = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, D] by half-width cos/sin [T, 1, D/2]: transformers' rotate_half arithmetic."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


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


class LeanAttention(nn.Module):
    """Fused qkv projection, RoPE, paged attention (the engine's function), o_proj."""

    def __init__(self, spec: LlamaSpec, layer_idx: int, device: Device = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = spec.head_dim
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.scaling = spec.head_dim**-0.5
        self.sizes = [spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2
        bias = spec.attention_bias
        self.qkv_proj = nn.Linear(spec.hidden_size, sum(self.sizes), bias=bias, device=device)
        self.o_proj = nn.Linear(self.sizes[0], spec.hidden_size, bias=bias, device=device)

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
    def __init__(self, spec: LlamaSpec, device: Device = None) -> None:
        super().__init__()
        hidden, inter, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class LeanDecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, layer_idx: int, device: Device = None) -> None:
        super().__init__()
        self.self_attn = LeanAttention(spec, layer_idx, device)
        self.mlp = LeanMLP(spec, device)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, device)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, device)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step | None
    ) -> torch.Tensor:
        """Positional arguments, hidden states first: a pipeline PassThrough stands in with that call."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, step)
        return h + self.mlp(self.post_attention_layernorm(h))


class LeanDecoder(nn.Module):
    """Embedding, layers, final norm; called by the pipeline stages with input_ids or inputs_embeds."""

    def __init__(self, spec: LlamaSpec, device: Device = None) -> None:
        super().__init__()
        # _weight: no init draw (on the meta device nn.Embedding's own draw imports torch._dynamo, ~1-3 s).
        weight = torch.empty(spec.vocab_size, spec.hidden_size, device=device)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, _weight=weight)
        self.layers = nn.ModuleList([LeanDecoderLayer(spec, i, device) for i in range(spec.num_layers)])
        self.norm: nn.Module = RMSNorm(spec.hidden_size, spec.rms_norm_eps, device)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", torch.empty(0), persistent=False)  # [positions, D/2], set_rope
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.attention: Any = None

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """cos/sin [positions, D] as transformers' rotary embedding gives them (halves repeated)."""
        half = cos.shape[-1] // 2
        self.cos = cos[:, :half].contiguous().to(self.embed_tokens.weight)
        self.sin = sin[:, :half].contiguous().to(self.embed_tokens.weight)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> LeanOutput:
        """Hidden states [1, T, hidden] after every layer this model holds and the final norm."""
        x = self.layers_out(input_ids, position_ids, inputs_embeds, kwargs)
        return LeanOutput(last_hidden_state=self.norm(x).unsqueeze(0))

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

    def __init__(self, spec: LlamaSpec, generation_config: Any = None, device: Device = None) -> None:
        """device="meta" builds no weights (loaders then call to_empty and fill them)."""
        super().__init__()
        self.spec = spec
        self.config = SimpleNamespace(_attn_implementation=None, vocab_size=spec.vocab_size)
        self.generation_config = generation_config
        """Read for eos ids (llm_engine.eos_token_ids): transformers' object or generation_config.json's."""
        self.model = LeanDecoder(spec, device)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, device=device)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.compiled: Any = None
        """compiled.compile_forward(self.flat_forward) once compile() ran (model.compile: compiled)."""

    def set_attn_implementation(self, name: str) -> None:
        """One of serving.engine.attention's registered names (autotune_paged, ...)."""
        self.model.attention = function_for(name)
        self.config._attn_implementation = name

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def hf_parameters(self) -> dict[str, torch.Tensor]:
        """transformers' parameter names -> the views of our (fused) parameters holding them. A tied lm_head
        is absent, as from transformers' named_parameters. Loading and dummy init write through these."""
        spec = self.spec
        kv = spec.num_kv_heads * spec.head_dim
        fused = {
            "qkv_proj": (("q_proj", "k_proj", "v_proj"), [spec.num_heads * spec.head_dim, kv, kv]),
            "gate_up_proj": (("gate_proj", "up_proj"), [spec.intermediate_size] * 2),
        }
        views: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            prefix, module, kind = f".{name}".rsplit(".", 2)
            if module in fused:
                parts, sizes = fused[module]
                for part, view in zip(parts, param.detach().split(sizes, dim=0), strict=True):
                    views[f"{prefix[1:]}.{part}.{kind}"] = view
            else:
                views[name] = param.detach()
        return views

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
            logits = self._run_compiled(input_ids[0], position_ids[0], logits_to_keep, kwargs)
            return LeanOutput(logits=logits)
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
