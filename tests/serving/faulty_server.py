"""`python -m tests.serving.faulty_server deploy.yaml`: the builtin server whose engine step raises once
a request arrives, as a CUDA error or a bug in a kernel would kill the step loop. Everything else (HTTP,
the step thread, the health watch, the exit) is the real server."""

from __future__ import annotations

import sys

from serving.config import DeploymentConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.outputs import RequestOutput
from serving.server.serve import serve


def _broken_step(self: LLMEngine) -> list[RequestOutput]:
    raise RuntimeError("injected fault: the engine step failed")


if __name__ == "__main__":
    LLMEngine.step = _broken_step  # type: ignore[method-assign]
    sys.exit(serve(DeploymentConfig.from_yaml(sys.argv[1])))
