"""Entry of one data-parallel replica: `python -m serving.engine.distributed.replica` (spawned by the
front end, serving.engine.distributed.data_parallel).

The replica is an ordinary engine (itself tensor- or pipeline-parallel when tp or pp > 1) driven by a
step loop like AsyncEngine's, fed through its pipe: ("add", ...), ("abort", id), ("stop",) in;
("out", [RequestOutput]) per step, ("error", id, message), ("metrics", text, EngineStats) out.
"""

from __future__ import annotations

import os
import sys
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.engine.llm_engine import LLMEngine

IDLE_WAIT_S = 0.1
GATHER_WAIT_S = 0.001
METRICS_INTERVAL_S = 0.25
"""Metrics text goes to the front end at most this often while busy (and once on going idle)."""


def main() -> int:
    from serving.engine.distributed.process import run_child

    return run_child(_serve)


def _serve(conn: Connection) -> int:
    from prometheus_client import generate_latest

    from serving.engine.distributed.process import child_config
    from serving.engine.factory import build_engine
    from serving.engine.metrics import EngineMetrics

    engine = build_engine(child_config())
    metrics = EngineMetrics()
    engine.register_metrics(metrics.registry)

    def push() -> None:
        conn.send(("metrics", generate_latest(metrics.registry).decode(), engine.stats()))

    def observe(step_seconds: float | None) -> None:
        totals = (engine.num_prompt_tokens_total, engine.num_generation_tokens_total)
        metrics.observe(engine.stats(), *totals, step_seconds)

    observe(None)
    conn.send(("ready", engine.vocab_size))
    push()
    last_push, dirty = time.monotonic(), False
    try:
        while True:
            timeout = 0.0 if engine.has_unfinished() else IDLE_WAIT_S
            while conn.poll(timeout):
                timeout = 0.0
                if not _apply(engine, conn, conn.recv()):
                    return 0
                dirty = True
            if not engine.has_unfinished():
                if dirty:
                    observe(None)
                    push()
                    last_push, dirty = time.monotonic(), False
                continue
            outputs = engine.step()
            if engine.last_step_idle:
                conn.poll(GATHER_WAIT_S)
                continue
            observe(engine.last_step_seconds)
            # Metrics go first when the replica falls idle, so a client that saw its last token scrapes them.
            if not engine.has_unfinished() or time.monotonic() - last_push >= METRICS_INTERVAL_S:
                push()
                last_push, dirty = time.monotonic(), False
            else:
                dirty = True
            if outputs:
                conn.send(("out", outputs))
    finally:
        engine.close()


def _apply(engine: LLMEngine, conn: Connection, message: tuple[Any, ...]) -> bool:
    """Apply one command; False on stop."""
    kind = message[0]
    if kind == "add":
        _, request_id, prompt, params, priority, arrival = message
        try:
            engine.add_request(request_id, prompt, params, priority, arrival_time=arrival)
        except ValueError as err:
            conn.send(("error", request_id, str(err)))
    elif kind == "abort":
        stop = engine.abort(message[1])
        if stop is not None:
            conn.send(("out", [stop]))
    elif kind == "stop":
        return False
    return True


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (seconds with torch loaded): the parent waits for us
