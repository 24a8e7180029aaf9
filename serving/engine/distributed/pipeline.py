"""Pipeline stages: contiguous decoder-layer ranges of a transformers decoder-only model.

Every stage keeps transformers' own forward (so rotary embeddings and masks stay the library's) and
replaces the layers it does not own with pass-throughs (their weights are freed). Stage 0 embeds the
tokens; the last stage applies the final norm and the lm_head. Hidden states go from stage to stage with
torch.distributed send/recv, tagged by micro-batch id; every stage receives each micro-batch's step
kwargs (positions, attention metadata) from rank 0 through its pipe, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from serving.engine.attention import METADATA_KWARG

TAG_HIDDEN = 0
TAG_TOKENS = 1
TAG_LOGITS = 2
TAG_SPACE = 4
"""Tags are micro_batch_id * TAG_SPACE + kind (kept below 2**24 by wrapping the id)."""
MAX_MICRO_BATCH_ID = 1 << 20


def tag(micro_batch_id: int, kind: int) -> int:
    return (micro_batch_id % MAX_MICRO_BATCH_ID) * TAG_SPACE + kind


def stage_ranges(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """[start, end) layer indices of each stage; the first stages take one more when it does not divide."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        end = start + base + (1 if stage < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


class PassThrough(nn.Module):
    """Stands in for a decoder layer another stage owns: returns the hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def decoder_of(model: nn.Module) -> Any:
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise ValueError(f"{type(model).__name__} has no .model.layers: pipeline stages cannot split it")
    return decoder


def make_stage(model: nn.Module, stage: int, pp: int) -> tuple[int, int]:
    """Cut `model` down to stage `stage` of `pp` in place; returns its [start, end) layer range."""
    decoder = decoder_of(model)
    layers = decoder.layers
    start, end = stage_ranges(len(layers), pp)[stage]
    for i in range(len(layers)):
        if not start <= i < end:
            layers[i] = PassThrough()
    if stage != pp - 1:
        decoder.norm = nn.Identity()
        model.lm_head = nn.Identity()
    if stage != 0:
        old = decoder.embed_tokens
        decoder.embed_tokens = nn.Embedding(
            1, old.embedding_dim, dtype=old.weight.dtype, device=old.weight.device
        )
    return start, end


def global_caches(
    local: list[tuple[torch.Tensor, torch.Tensor]], start: int, num_layers: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per global layer index: this stage's caches for its layers, empty tensors elsewhere."""
    empty = local[0][0].new_empty(0)
    caches = [(empty, empty)] * num_layers
    caches[start : start + len(local)] = local
    return caches


@torch.inference_mode()
def run_stage(
    model: nn.Module, first: bool, last: bool, kwargs: dict[str, Any], hidden: torch.Tensor | None
) -> torch.Tensor:
    """Hidden states after this stage's layers, or the kept logits [rows, vocab] on the last stage."""
    inputs: dict[str, Any] = {
        "position_ids": kwargs["position_ids"],
        "use_cache": False,
        METADATA_KWARG: kwargs[METADATA_KWARG],
    }
    if first:
        inputs["input_ids"] = kwargs["input_ids"]
    else:
        inputs["inputs_embeds"] = hidden
    if last:
        logits: torch.Tensor = model(logits_to_keep=kwargs["logits_to_keep"], **inputs).logits[0]
        return logits
    out: torch.Tensor = decoder_of(model)(**inputs).last_hidden_state
    return out
