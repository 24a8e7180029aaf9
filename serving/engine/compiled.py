"""Compiled execution of the lean forward (`model.compile: compiled`): torch.compile (inductor), frozen.

What is compiled is the whole step's dense work, every layer unrolled: embedding, norms, fused projections,
RoPE, MLP, final norm, lm_head on the kept rows. Attention stays outside the graph as one opaque custom op
(`autotune::lean_attention`), as vLLM splits its graphs around attention: it reads the step's metadata
(Python lists, block tables: shapes that change every step) from `current_step`, set by the forward before
the graph runs, so the graph itself sees only three tensors (token ids, positions, kept rows) and never
recompiles on the metadata.
Shapes: token counts and kept-row counts are padded up to the next bucket (powers of two, at least 2), and
the graph is compiled with dynamic sizes (mark_dynamic): one compile at start-up, then no step recompiles
(dynamic=True on the old path recompiled every step because lists reached the graph). Padding
rows compute garbage that attention never writes to the cache and that is sliced off before sampling.
Freezing (inductor's `freezing`) turns the weights into constants, so the Linear weights are prepacked
for oneDNN once. The on-disk caches (inductor's FX graph cache, TORCHINDUCTOR_CACHE_DIR) are shared by
every process of the machine that uses the same directory, so the trials of a study compile once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "autotune-serving" / "inductor"
"""Used when TORCHINDUCTOR_CACHE_DIR is unset: one directory for every trial and server of this user."""

WARMUP_TOKENS = (2,)
"""Token counts run at start-up: every bucket shares one dynamic graph, so one run compiles it."""

_current: Any = None
"""The Step (llama.Step) whose attention the custom op computes; None while warming up."""


@contextmanager
def current_step(step: Any) -> Iterator[None]:
    """The step the graph's attention op reads while the compiled forward runs."""
    global _current
    previous, _current = _current, step
    try:
        yield
    finally:
        _current = previous


@torch.library.custom_op("autotune::lean_attention", mutates_args=())
def lean_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scaling: float
) -> torch.Tensor:
    """Attention of the real (unpadded) tokens of the current step; padding rows give zeros.

    It writes K/V into the step's caches (not arguments of the op: the graph never reads them).
    """
    out = torch.zeros_like(q)
    step = _current
    if step is None:  # warm-up: compile the graph around an op that has no cache to read
        return out
    tokens = step.metadata.slot_mapping.shape[0]
    module = SimpleNamespace(layer_idx=layer, scaling=scaling)
    out[:tokens] = step.attend(module, q[:tokens], k[:tokens], v[:tokens])
    return out


@lean_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scaling: float) -> torch.Tensor:
    return torch.empty_like(q)


def bucket(n: int) -> int:
    """The next power of two >= max(n, 2): the padded size a step runs at. Never 1, because torch.compile
    specialises size-1 dimensions: one decode row runs as two (the same weight reads), and one graph
    serves every step."""
    return 1 << max(1, n - 1).bit_length()


def compile_forward(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`forward(input_ids [T], positions [T], keep [K]) -> logits [K, V]` compiled by inductor, frozen."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(DEFAULT_CACHE_DIR))
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    inductor_config.fx_graph_cache = True
    compiled: Callable[..., torch.Tensor] = torch.compile(forward, backend="inductor")
    return compiled


def padded(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` [n] zero-padded to [size]; marked dynamic so larger buckets reuse one graph."""
    if tensor.shape[0] != size:
        tensor = torch.cat([tensor, tensor.new_zeros(size - tensor.shape[0])])
    torch._dynamo.mark_dynamic(tensor, 0)
    return tensor
