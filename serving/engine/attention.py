"""Attention over the paged KV cache, plugged into transformers' model classes through AttentionInterface.

The model code stays transformers' own (so DeepSpeed AutoTP can shard it); each layer calls one of these
functions with query [1, H, T, D] and rotated key/value [1, KVH, T, D] for the T tokens of the step (all
sequences flattened, prefill and decode mixed). The function writes key/value into the cache at the step's
slots, then attends each token to its own sequence's cached context. Head counts come from the tensors,
never the config, because a tensor-parallel rank sees only its share of the heads.

Backends (config.attention), all giving the same greedy tokens:
- eager: reference math, one sequence at a time: gather its K/V, matmul, causal mask, softmax, matmul.
- sdpa: torch SDPA over a padded [sequences, max query, max context] batch with enable_gqa and a mask.
- paged: decode rows gather their context's whole blocks (one index_select of block-sized rows) into one
  SDPA with the query heads of each KV head stacked as its queries (masked past each row's length);
  prefill rows form their own padded batch, so decodes never pay for prompt padding. No per-sequence loops.
Metadata tensors are built once per step (metadata.py) and reused by every layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from serving.config import AttentionBackend
from serving.engine.attention_metadata import AttentionMetadata, PaddedBatch

METADATA_KWARG = "paged_attention_metadata"
"""Keyword the runner passes to model(...); transformers hands it through to the attention function."""


def _cached_kv(
    module: Any, kwargs: dict[str, Any], key: torch.Tensor, value: torch.Tensor
) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Write the step's key/value into this layer's cache at the step's slots; the metadata and the cache."""
    meta, layer = _metadata(module, kwargs)
    k_cache, v_cache = meta.kv_caches[layer]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1))
    return meta, k_cache, v_cache


def _metadata(layer: Any, kwargs: dict[str, Any]) -> tuple[AttentionMetadata, int]:
    meta = kwargs.get(METADATA_KWARG)
    if meta is None:
        raise RuntimeError(
            f"paged attention needs the {METADATA_KWARG}= keyword on model(...): run the model through "
            "serving.engine.model_runner.ModelRunner"
        )
    return meta, layer.layer_idx


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Reference: per sequence, scores = q k^T * scale, causal mask by position, softmax, times v."""
    meta, k_cache, v_cache = _cached_kv(module, kwargs, key, value)
    num_heads, head_dim = query.shape[1], query.shape[3]
    group = num_heads // k_cache.shape[1]
    scale = scaling if scaling is not None else head_dim**-0.5
    out = query.new_empty(query.shape[2], num_heads, head_dim)
    for q_start, q_len, ctx_slots, pos_start in zip(
        meta.query_starts, meta.query_lens, meta.context_slots, meta.starts, strict=True
    ):
        q = query[0, :, q_start : q_start + q_len]  # [H, q, D]
        k = k_cache[ctx_slots].transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, D]
        v = v_cache[ctx_slots].transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, q, L]
        q_pos = torch.arange(pos_start, pos_start + q_len, device=q.device)
        k_pos = torch.arange(k.shape[1], device=q.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out[q_start : q_start + q_len] = torch.matmul(probs, v).transpose(0, 1)
    return out.unsqueeze(0), None


def sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One SDPA over sequences padded to [B, max query, max context]; padding rows are dropped after."""
    meta, k_cache, v_cache = _cached_kv(module, kwargs, key, value)
    return _padded_sdpa(query, k_cache, v_cache, meta.padded_batch(), scaling).unsqueeze(0), None


def _padded_sdpa(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pad: PaddedBatch, scaling: float | None
) -> torch.Tensor:
    """SDPA over the rows `pad` gathers into [B, max query, max context]; the real rows as [N, H, D]."""
    num_heads, head_dim = query.shape[1], query.shape[3]
    batch, qmax = pad.query_index.shape
    q = query[0].transpose(0, 1).index_select(0, pad.query_index.view(-1))
    q = q.view(batch, qmax, num_heads, head_dim).transpose(1, 2)  # [B, H, Qmax, D]
    k = _gather(k_cache, pad.key_slots)  # [B, KVH, Lmax, D]
    v = _gather(v_cache, pad.key_slots)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=pad.mask, scale=scaling, enable_gqa=True)
    return o.transpose(1, 2).reshape(-1, num_heads, head_dim).index_select(0, pad.output_index)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[B, L] slots of a [slots, KVH, D] cache as [B, KVH, L, D]: one index_select over the flat slots
    (advanced indexing with a 2-D index runs many times slower on the CPU)."""
    batch, length = slots.shape
    rows = cache.index_select(0, slots.view(-1))
    return rows.view(batch, length, cache.shape[1], cache.shape[2]).transpose(1, 2)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, nb] block ids of a [slots, KVH, D] cache as [B, KVH, nb * block_size, D]: one index_select of
    whole blocks (a block's slots are one contiguous row of the cache)."""
    batch, num = blocks.shape
    rows = cache.view(-1, block_size * cache.shape[1] * cache.shape[2]).index_select(0, blocks.view(-1))
    return rows.view(batch, num * block_size, cache.shape[1], cache.shape[2]).transpose(1, 2)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    mask: torch.Tensor | None,
    block_size: int,
    scaling: float | None,
) -> torch.Tensor:
    """One query per row [B, H, D] over its context's whole blocks [B, nb] (masked by `mask`): [B, H, D].

    The query heads sharing a KV head are stacked as that KV head's queries ([B, KVH, group, D]): one plain
    SDPA, no GQA expansion of K/V. The gather copies each row's context, yet gather + SDPA measured 1.7-7x
    faster on the CPU than torch's flex_attention reading the cache in place through a BlockMask
    (bench/paged_attention.py; docs/benchmarks.md, "Paged decode attention").
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    q = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    k = _gather_blocks(k_cache, blocks, block_size)  # [B, KVH, L, D]
    v = _gather_blocks(v_cache, blocks, block_size)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return o.reshape(batch, num_heads, head_dim)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Decode rows (first in the batch) through their block tables; prefill rows as a padded batch."""
    meta, k_cache, v_cache = _cached_kv(module, kwargs, key, value)
    paged = meta.paged_batch()
    parts: list[torch.Tensor] = []
    num_decode = paged.num_decode
    if num_decode:
        q = query[0, :, :num_decode].transpose(0, 1)  # [Bd, H, D]
        parts.append(
            decode_attention(
                q, k_cache, v_cache, paged.decode_blocks, paged.decode_mask, meta.block_size, scaling
            )
        )
    if paged.prefill is not None:
        parts.append(_padded_sdpa(query, k_cache, v_cache, paged.prefill, scaling))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out.unsqueeze(0), None


IMPLEMENTATIONS = {"eager": eager_attention, "sdpa": sdpa_attention, "paged": paged_attention}


def implementation_name(backend: AttentionBackend) -> str:
    """The engine's name for this backend (what function_for maps back), without registering it."""
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"attention={backend!r} is invalid: choose one of {', '.join(IMPLEMENTATIONS)}")
    return f"autotune_{backend}"


def attn_implementation_name(backend: AttentionBackend) -> str:
    """The name to pass as attn_implementation when loading a transformers model for this backend
    (registered with transformers here: the lean forward needs no registration, nor the import)."""
    from transformers import AttentionInterface

    name = implementation_name(backend)
    AttentionInterface.register(name, IMPLEMENTATIONS[backend])
    return name


def function_for(name: str) -> Any:
    """The attention function behind a name attn_implementation_name returned (the lean forward calls it
    directly instead of through transformers' registry)."""
    for backend, fn in IMPLEMENTATIONS.items():
        if name == f"autotune_{backend}":
            return fn
    raise ValueError(
        f"attention implementation {name!r} is not one of the engine's: load the model with "
        "attn_implementation_name(config.attention)"
    )
