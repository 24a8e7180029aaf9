"""Entry of ranks 1..N-1 of a replica: `python -m serving.engine.distributed.worker` (spawned by rank 0).

A tensor-parallel follower runs rank 0's forward on its shard, step by step as rank 0 sends them; a
pipeline stage receives hidden states from the previous stage, runs its layers and sends the result on
(the last stage sends sampled-row tokens, and the logits of rows that sample randomly, back to rank 0).
A stage reports its busy time to rank 0 through the pipe every REPORT_INTERVAL_S (serving_pipeline_*).
"""

from __future__ import annotations

import os
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

REPORT_INTERVAL_S = 0.5


def main() -> int:
    from serving.engine.distributed.process import run_child

    return run_child(_serve)


def _serve(conn: Connection) -> int:
    import torch

    from serving.engine.distributed.pipeline import global_caches
    from serving.engine.distributed.process import child_config
    from serving.engine.distributed.rank_group import load_rank_model, rank_context
    from serving.engine.model_runner import ModelRunner

    config = child_config()  # its parallel.allreduce is the group's, resolved by rank 0
    ctx = rank_context(config, int(os.environ["RANK"]), config.parallel.allreduce)
    part = load_rank_model(config, ctx)
    caches = ModelRunner(  # only its caches are kept: rank 0 builds every step's inputs
        part.model,
        attention=config.attention,
        num_blocks=part.num_blocks,
        block_size=config.cache.block_size,
        device=ctx.device,
    ).kv_caches
    conn.send(("ready", ctx.rank))
    with torch.inference_mode():
        if config.parallel.tp > 1:
            _follow_tensor_parallel(conn, part.model, caches, ctx.device)
        else:
            caches = global_caches(caches, part.first_layer, part.num_layers)
            _run_pipeline_stage(conn, part.model, caches, ctx.rank, config.parallel.pp, ctx.device)
    return 0


def _follow_tensor_parallel(conn: Connection, model: Any, caches: Any, device: Any) -> None:
    from serving.engine.distributed.step_codec import attach_caches, decode

    while True:
        message = decode(conn.recv_bytes(), device)
        if message[0] == "stop":
            return
        _, args, kwargs = message
        attach_caches(kwargs, caches)
        model(*args, **kwargs)


def _run_pipeline_stage(conn: Connection, model: Any, caches: Any, stage: int, pp: int, device: Any) -> None:
    import torch
    import torch.distributed as dist

    from serving.engine.distributed.busy import BusyMeter
    from serving.engine.distributed.pipeline import TAG_HIDDEN, TAG_LOGITS, TAG_TOKENS, run_stage, tag
    from serving.engine.distributed.step_codec import attach_caches, decode

    last = stage == pp - 1
    busy, last_report = BusyMeter(), time.monotonic()
    pending: list[Any] = []  # isend handles (and their tensors) until complete
    while True:
        message = decode(conn.recv_bytes(), device)
        if message[0] == "stop":
            for work, _ in pending:
                work.wait()
            return
        _, mb, hidden_shape, dtype, kwargs, random_rows = message
        attach_caches(kwargs, caches)
        hidden = torch.empty(hidden_shape, dtype=dtype, device=device)
        dist.recv(hidden, src=stage - 1, tag=tag(mb, TAG_HIDDEN))
        start = time.perf_counter()
        out = run_stage(model, False, last, kwargs, hidden)
        if last:
            tokens = out.argmax(dim=-1)
            sends = [(tokens, 0, TAG_TOKENS)]
            if random_rows:
                sends.append((out[random_rows].contiguous(), 0, TAG_LOGITS))
        else:
            sends = [(out.contiguous(), stage + 1, TAG_HIDDEN)]
        busy.add(time.perf_counter() - start)
        for tensor, dst, kind in sends:
            pending.append((dist.isend(tensor, dst=dst, tag=tag(mb, kind)), tensor))
        pending = [(w, t) for w, t in pending if not w.is_completed()]
        last_report = _report(conn, busy, last_report)


def _report(conn: Connection, busy: Any, last_report: float) -> float:
    now = time.monotonic()
    if now - last_report < REPORT_INTERVAL_S:
        return last_report
    conn.send(("busy", busy.seconds, busy.count))
    return now


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (seconds with torch loaded): the parent waits for us
