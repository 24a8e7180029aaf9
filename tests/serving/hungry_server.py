"""`python -m tests.serving.hungry_server serve --config deploy.yaml --port N`: `serving serve` whose engine,
some steps into its traffic, needs a buffer larger than the machine (as a long prompt's activations can
on a GPU). The allocation really fails in torch's allocator inside the step loop; everything after it
is the real server's: the step loop dies, /health turns 503, the process exits 70.

The address space is capped just before the allocation, so it fails at once whatever the kernel's
overcommit policy and never presses on a machine others share."""

from __future__ import annotations

import resource
import sys

import psutil
import torch

from serving.cli import main
from serving.engine.llm_engine import LLMEngine
from serving.engine.outputs import RequestOutput

STEPS_BEFORE_THE_FAULT = 20
"""Past the warm-up's few steps: the fault falls under the timed load."""

_real_step = LLMEngine.step
_steps = [0]


def _hungry_step(self: LLMEngine) -> list[RequestOutput]:
    _steps[0] += 1
    if _steps[0] > STEPS_BEFORE_THE_FAULT:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = psutil.Process().memory_info().vms + 2**30
        if hard != resource.RLIM_INFINITY:  # already capped by whoever started us: stay within it
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        torch.empty(2 * psutil.virtual_memory().total, dtype=torch.uint8)
    return _real_step(self)


if __name__ == "__main__":
    LLMEngine.step = _hungry_step  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
