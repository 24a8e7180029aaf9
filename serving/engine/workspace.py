"""Buffers the step reuses from layer to layer and step to step instead of allocating them afresh.

The decode gather copies every decode row's context (K and V, megabytes at batch 32) once per layer. A fresh
tensor of that size is a fresh mapping from the allocator: page faults and zeroing on every call. Writing
into a buffer kept here made float32 decode attention 2.8-3.6x faster at batch 32 on the CPU (bench numbers
in docs/benchmarks.md, "Preallocated step buffers"); smaller gathers measured the same either way.
"""

from __future__ import annotations

import torch


class Workspace:
    """Named flat buffers that grow to the largest size asked for and are then reused.

    A buffer's contents live until the next request for the same name: the caller must be done with it
    (each layer's attention consumes its gathered K/V before the next layer gathers again).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous [shape] tensor of `like`'s dtype and device, uninitialised: memory shared with the
        earlier takes of `name`."""
        numel = 1
        for size in shape:
            numel *= size
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)
