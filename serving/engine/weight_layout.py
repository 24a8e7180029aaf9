"""Linear weights laid out for decode on the CPU: stored as [in, out], still seen as [out, in].

Decode multiplies a handful of rows by every weight, so a step is bound by how fast the weights stream
from memory. nn.Linear keeps its weight as a contiguous [out, in] matrix that MKL's GEMM reads transposed;
on this kind of CPU that read runs at about half the bandwidth of the same GEMM over a contiguous
[in, out] matrix (llama-57m's 32000x512 lm_head at one row: 5.8 ms vs 2.8 ms). Giving each Linear a
weight that is the transposed view of a contiguous [in, out] tensor keeps every module, shape and
state-dict key as they were; F.linear then multiplies by the contiguous matrix directly.
Side by side (`bench/decode_step.py --attention paged --layout engine row-major engine row-major`, two
rounds): engine steps at batch 1 / 8 / 32 of 15.9-17.6 / 34.3-37.3 / 56-59 ms against 19.0-22.6 /
36.0-48.7 / 56-68 ms row-major. Prefill-sized batches (hundreds of rows) run at the same speed either way.
"""

from __future__ import annotations

from torch import nn


def relayout_linear_weights(model: nn.Module) -> int:
    """Store every plain nn.Linear weight of `model` column-major; returns how many were changed.

    A weight shared with another module (tied input embeddings) is left alone: the embedding lookup
    wants rows contiguous, and a second copy would double that matrix.
    """
    shared = {
        p.data_ptr() for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)
    }
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.data_ptr() not in shared:
            weight = module.weight.detach()
            module.weight = nn.Parameter(weight.t().contiguous().t(), requires_grad=False)
            changed += 1
    return changed
