"""Tensor parallelism for the lean forward (llama.py), as gpt-fast's tp.py shards its model: no DeepSpeed
AutoTP, which only knows transformers' unfused Linears.

Per rank: the fused qkv and gate/up projections keep their rank's share of the heads and of the
intermediate columns (column-parallel, no communication), o_proj, down_proj and the lm_head keep their
rank's share of the input features and all-reduce their partial outputs (row-parallel), through
deepspeed.comm.inference_all_reduce: the group's all-reduce (shared memory or the process group, per
parallel.allreduce) that AllReduceTimer counts, as under AutoTP. Every rank loads the whole model first
(the same seeded weights) and keeps its slices; its KV cache holds its own KV heads.
"""

from __future__ import annotations

import torch
from torch import nn

from serving.config import ConfigError
from serving.engine.llama import LeanAttention, LeanLlama, LeanMLP


class RowParallel(nn.Module):
    """This rank's input columns of a Linear; the partial products summed over the ranks."""

    def __init__(self, linear: nn.Linear, rank: int, tp: int) -> None:
        super().__init__()
        width = linear.in_features // tp
        self.start, self.stop = rank * width, (rank + 1) * width
        self.linear = nn.Linear(width, linear.out_features, bias=False, dtype=linear.weight.dtype)
        self.linear.weight = nn.Parameter(
            linear.weight.detach()[:, self.start : self.stop].contiguous(), False
        )
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import deepspeed.comm as ds_comm

        if x.shape[-1] != self.linear.in_features:  # the lm_head gets the whole hidden state
            x = x[..., self.start : self.stop]
        out = self.linear(x)
        ds_comm.inference_all_reduce(out)
        return out if self.bias is None else out + self.bias


def _rows(linear: nn.Linear, parts: list[tuple[int, int]]) -> nn.Linear:
    """A Linear of the given output-row ranges of `linear`, concatenated."""
    weight = torch.cat([linear.weight.detach()[a:b] for a, b in parts]).contiguous()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
    out.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(torch.cat([linear.bias.detach()[a:b] for a, b in parts]), False)
    return out


def check_lean_tp(model: LeanLlama, tp: int) -> None:
    spec = model.spec
    sizes = {
        "attention heads": spec.num_heads,
        "KV heads": spec.num_kv_heads,
        "intermediate size": spec.intermediate_size,
        "hidden size": spec.hidden_size,
    }
    bad = [f"{name} {value}" for name, value in sizes.items() if value % tp]
    if bad:
        raise ConfigError(f"parallel.tp={tp} does not divide the model's {', '.join(bad)}: use a divisor")


def shard_lean(model: LeanLlama, rank: int, tp: int) -> LeanLlama:
    """Cut `model` down to rank `rank` of `tp` in place (see the module docstring)."""
    check_lean_tp(model, tp)
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, rank, tp)  # type: ignore[arg-type]
        _shard_mlp(layer.mlp, rank, tp)  # type: ignore[arg-type]
    model.lm_head = RowParallel(model.lm_head, rank, tp)  # type: ignore[assignment]
    return model


def _shard_attention(attn: LeanAttention, rank: int, tp: int) -> None:
    q, kv = attn.sizes[0], attn.sizes[1]
    q_part, kv_part = q // tp, kv // tp
    parts = [
        (rank * q_part, (rank + 1) * q_part),
        (q + rank * kv_part, q + (rank + 1) * kv_part),
        (q + kv + rank * kv_part, q + kv + (rank + 1) * kv_part),
    ]
    attn.qkv_proj = _rows(attn.qkv_proj, parts)
    attn.o_proj = RowParallel(attn.o_proj, rank, tp)  # type: ignore[assignment]
    attn.num_heads //= tp
    attn.num_kv_heads //= tp
    attn.sizes = [q_part, kv_part, kv_part]


def _shard_mlp(mlp: LeanMLP, rank: int, tp: int) -> None:
    inter = mlp.down_proj.in_features
    part = inter // tp
    mlp.gate_up_proj = _rows(
        mlp.gate_up_proj, [(rank * part, (rank + 1) * part), (inter + rank * part, inter + (rank + 1) * part)]
    )
    mlp.down_proj = RowParallel(mlp.down_proj, rank, tp)  # type: ignore[assignment]
