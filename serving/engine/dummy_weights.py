"""Seeded dummy weights (`load_format: dummy`), one draw order for both forwards the engine runs: every
parameter named as transformers names it, in sorted name order, from one generator (model_loader.py's
docstring says why the gain)."""

from __future__ import annotations

import math

import torch

DUMMY_WEIGHT_GAIN = 1.5
"""Dummy matrices have std gain / sqrt(fan_in): large enough that greedy outputs vary from token to token."""


@torch.no_grad()
def draw_dummy(views: dict[str, torch.Tensor], seed: int) -> None:
    """Matrices ~ N(0, gain / sqrt(fan_in)), 1-D norm weights 1, biases 0, name by name in sorted order,
    in place (the tensors are float32 on the CPU, so the same seed gives the same model everywhere)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, view in sorted(views.items()):
        if view.dim() >= 2:
            view.normal_(0.0, DUMMY_WEIGHT_GAIN / math.sqrt(view[0].numel()), generator=generator)
        elif name.endswith("bias"):
            view.zero_()
        else:
            view.fill_(1.0)
