"""Parallel serving (issue 4): layouts are validated, tp2/pp2/dp2 give the greedy tokens of dp=tp=pp=1,
and a dead rank ends the server with a non-zero code and no process left.

Each tensor/pipeline layout runs in its own Python process (python this_file.py <layout>): one parallel
engine (its worker ranks spawned by it), checked under every scheduling policy against a one-rank engine
on the same seeded weights; the scheduler lives on rank 0 only, so each policy gets a fresh scheduler.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from serving.config import ConfigError, DeploymentConfig
from serving.engine.distributed.pipeline import stage_ranges
from serving.engine.distributed.placement import split_cpus
from serving.engine.distributed.process import EXIT_RANK_DIED
from serving.engine.distributed.validate import validate_parallel
from serving.launch import ServerProcess

TINY = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "model_type": "llama"}
"""llama-tiny's geometry."""
BASE = {
    "model.path": "llama-tiny",
    "model.max_model_len": 256,
    "scheduler.max_num_batched_tokens": 256,
    "cache.kv_cache_memory_gb": 0.01,
}
POLICIES: dict[str, dict[str, Any]] = {
    "request": {"scheduler.policy": "request"},
    "static": {"scheduler.policy": "static", "scheduler.max_num_seqs": 4, "scheduler.batch_wait_ms": 0.0},
    # max_num_seqs 2 < 6 prompts: several micro-batches are in flight in a pipeline
    "continuous": {"scheduler.policy": "continuous", "scheduler.max_num_seqs": 2},
    "chunked": {
        "scheduler.policy": "continuous",
        "scheduler.chunked_prefill": True,
        "scheduler.max_num_batched_tokens": 16,
        "scheduler.max_num_seqs": 3,
    },
}
LAYOUTS = {"tp2": {"parallel.tp": 2}, "pp2": {"parallel.pp": 2}}
NUM_TOKENS = 8


def config(**overrides: Any) -> DeploymentConfig:
    return DeploymentConfig().replace(**{**BASE, **overrides})


def random_prompts(seed: int, count: int = 6) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 31000) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


# --- validation (no processes) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"parallel.tp": 3}, "parallel.tp=3"),
        ({"parallel.tp": 4}, "parallel.tp=4"),  # divides 4 heads but not 2 KV heads
        ({"parallel.pp": 3}, "parallel.pp=3"),
        ({"parallel.dp": 3}, "parallel.oversubscribe"),
        ({"parallel.tp": 2, "parallel.pp": 2, "parallel.oversubscribe": True}, "parallel.pp=2"),
        ({"parallel.tp": 2, "precision.quantization": "int8_dynamic"}, "precision.quantization"),
    ],
)
def test_invalid_layouts_are_refused_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_parallel(config(**overrides), TINY, num_devices=2)


def test_valid_layouts_pass() -> None:
    for overrides in ({"parallel.tp": 2}, {"parallel.pp": 2}, {"parallel.dp": 2}):
        validate_parallel(config(**overrides), TINY, num_devices=2)
    validate_parallel(config(**{"parallel.dp": 2, "parallel.tp": 2, "parallel.oversubscribe": True}), TINY, 2)
    with pytest.raises(ConfigError, match="own GPU"):
        validate_parallel(config(**{"parallel.dp": 4, "parallel.oversubscribe": True}), TINY, 2, "cuda")


def test_cores_and_layers_are_split_evenly() -> None:
    assert split_cpus([3, 1, 2, 0], 2) == [[0, 1], [2, 3]]
    assert split_cpus([0, 1, 2], 2) == [[0, 1], [2]]
    assert split_cpus([0, 1], 4) == [[0], [1], [0], [1]]  # oversubscribed: one core each, shared
    assert stage_ranges(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert stage_ranges(2, 2) == [(0, 1), (1, 2)]


def test_step_codec_round_trips_attention_metadata() -> None:
    import torch

    from serving.engine.attention_metadata import build_metadata
    from serving.engine.distributed.step_codec import decode, encode

    caches = [(torch.zeros(64, 1, 8), torch.zeros(64, 1, 8))]
    for backend in ("eager", "sdpa", "paged"):
        meta = build_metadata(
            backend,
            caches,
            16,
            starts=[20, 0],
            query_lens=[1, 5],
            block_tables=[[1, 2], [3]],
            num_decode=1,
            device=torch.device("cpu"),
        )
        meta.kv_caches = []
        back = decode(encode(("step", (), {"meta": meta, "flag": False})), torch.device("cpu"))
        assert back[0] == "step" and back[2]["flag"] is False
        got = back[2]["meta"]
        assert type(got) is type(meta)
        for name, value in vars(meta).items():
            other = getattr(got, name)
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other) and value.dtype == other.dtype, name
    assert decode(pickle.dumps(("stop",)), torch.device("cpu")) == ("stop",)


@pytest.mark.parametrize("routing", ["least_outstanding", "round_robin"])
def test_front_end_routing(routing: str) -> None:
    from serving.engine.distributed.data_parallel import DataParallelEngine, Replica

    replicas = [Replica(i, child=None) for i in range(3)]  # type: ignore[arg-type]  # routing needs no process
    for replica in replicas:
        replica.vocab_size = 32000
    engine = DataParallelEngine(config(**{"parallel.dp_routing": routing}), replicas, tokenizer=None)
    picks = []
    for i in range(6):
        chosen = engine._route()
        picks.append(chosen.index)
        if i < 2:
            chosen.outstanding.add(f"long-{i}")  # replicas 0 and 1 stay busy
    if routing == "round_robin":
        assert picks == [0, 1, 2, 0, 1, 2]
    else:
        assert picks == [0, 1, 2, 2, 2, 2], picks  # 0 and 1 keep one request each, 2 stays free


# --- greedy equality, tensor and pipeline parallel --------------------------------------------


def _equality_run(layout: str) -> dict[str, Any]:
    """In a fresh process: {policy: {"ref": tokens, "got": tokens}} for one parallel engine."""
    from serving.engine.factory import build_engine
    from serving.engine.llm_engine import LLMEngine
    from serving.engine.sampling_params import SamplingParams
    from serving.engine.scheduler import Scheduler

    prompts = random_prompts(seed=len(layout))
    greedy = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    results: dict[str, Any] = {}
    engine: Any = build_engine(config(**LAYOUTS[layout]))
    try:
        for name, overrides in POLICIES.items():
            cfg = config(**overrides)
            ref = LLMEngine.from_config(cfg).generate(prompts, greedy)
            engine.scheduler = Scheduler(
                cfg.scheduler,
                engine.block_manager,
                max_model_len=engine.max_model_len,
                eos_token_ids=engine.scheduler.eos_token_ids,
            )
            if hasattr(engine, "depth"):
                engine.depth = 2 if cfg.scheduler.policy == "continuous" else 1
            if hasattr(engine, "peak_inflight"):
                engine.peak_inflight = 0
            got = engine.generate(prompts, greedy)
            results[name] = {
                "ref": ref,
                "got": got,
                "free": engine.block_manager.num_free_blocks,
                "total": engine.block_manager.num_blocks,
                "peak_inflight": getattr(engine, "peak_inflight", None),
            }
        if hasattr(engine, "inflight"):
            # Seeded sampling: the last stage sends these rows' logits back; rank 0 samples them.
            seeded = [
                SamplingParams(max_tokens=NUM_TOKENS, temperature=0.8, seed=i) for i in range(len(prompts))
            ]
            ref = LLMEngine.from_config(cfg).generate(prompts, seeded)
            results["seeded"] = {"ref": ref, "got": engine.generate(prompts, seeded)}
            results["stage_steps"] = [meter.count for meter in engine.group.busy]
    finally:
        engine.close()
    return results


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_engine_matches_one_rank_under_every_policy(layout: str) -> None:
    proc = subprocess.run(
        [sys.executable, __file__, layout], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for policy in POLICIES:
        r = results[policy]
        assert r["got"] == r["ref"], f"{layout} {policy}: tokens differ"
        assert len({t for seq in r["ref"] for t in seq}) > NUM_TOKENS, "degenerate reference output"
        assert r["free"] == r["total"], f"{layout} {policy}: KV blocks leaked"
    if layout == "pp2":
        assert min(results["stage_steps"]) > 0
        assert results["continuous"]["peak_inflight"] == 2, "micro-batches never overlapped"
        assert results["request"]["peak_inflight"] == 1
        assert results["seeded"]["got"] == results["seeded"]["ref"], "seeded sampling differs"


# --- data parallel and rank death, through the real server ---------------------------------------


def _server(tmp_path: Path, name: str, **overrides: Any) -> ServerProcess:
    cfg = config(**{"server.port": 0, **overrides})
    server = ServerProcess(cfg, log_path=tmp_path / f"{name}.log")
    server.start()
    server.wait_healthy(180)
    return server


def _complete(client: httpx.Client, url: str, prompt: list[int]) -> str:
    body = {
        "model": "llama-tiny",
        "prompt": prompt,
        "max_tokens": NUM_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    response = client.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return pids


def health_until_exit(server: ServerProcess, timeout_s: float = 20.0) -> tuple[int | None, list[int]]:
    """(exit code, distinct /health statuses in the order seen) while waiting for the server to exit."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1.0) as client:
        while server._proc is not None and server._proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                status = client.get(f"{server.url}/health").status_code
                if not seen or seen[-1] != status:
                    seen.append(status)
            time.sleep(0.05)
    return (server._proc.poll() if server._proc is not None else None), seen


def _kill_child_and_expect_exit(server: ServerProcess) -> None:
    """A dead child: /health turns 503, then the server exits with EXIT_RANK_DIED, leaving nothing."""
    assert server.pid is not None
    children = psutil.Process(server.pid).children(recursive=True)
    assert children, "the server has no worker processes"
    victim = children[-1]
    victim.send_signal(signal.SIGKILL)
    code, seen = health_until_exit(server)
    assert code == EXIT_RANK_DIED, f"server exit code {code}, expected {EXIT_RANK_DIED}"
    assert 503 in seen, f"/health never answered 503 before the exit (saw {seen})"
    deadline = time.monotonic() + 10
    while _group_pids(server.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_pids(server.pid), "processes of the server's group were left running"
    server.stop()


@pytest.mark.slow
def test_dp2_matches_one_replica_and_labels_metrics_then_dies_cleanly(tmp_path: Path) -> None:
    prompts = random_prompts(seed=7, count=8)
    one = _server(tmp_path, "dp1")
    try:
        with httpx.Client() as client:
            ref = [_complete(client, one.url, p) for p in prompts]
    finally:
        one.stop()
    server = _server(tmp_path, "dp2", **{"parallel.dp": 2})
    try:
        from concurrent.futures import ThreadPoolExecutor

        with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: _complete(client, server.url, p), prompts))
            metrics = client.get(f"{server.url}/metrics").text
        assert got == ref
        for replica in ("0", "1"):
            line = next(
                (
                    m
                    for m in metrics.splitlines()
                    if m.startswith("serving_generation_tokens_total") and f'replica="{replica}"' in m
                ),
                None,
            )
            assert line is not None, f"no generation counter for replica {replica}"
            assert float(line.split()[-1]) > 0, f"replica {replica} served nothing: {line}"
        _kill_child_and_expect_exit(server)
    finally:
        server.stop()


@pytest.mark.slow
def test_killing_a_tensor_parallel_rank_ends_the_server(tmp_path: Path) -> None:
    server = _server(tmp_path, "tp2", **{"parallel.tp": 2})
    try:
        with httpx.Client() as client:
            assert client.get(f"{server.url}/health").status_code == 200
            _complete(client, server.url, random_prompts(seed=3, count=1)[0])
            metrics = client.get(f"{server.url}/metrics").text
        assert "serving_tp_allreduce_seconds_total" in metrics
        _kill_child_and_expect_exit(server)
    finally:
        server.stop()


@pytest.mark.slow
def test_killing_a_pipeline_stage_ends_the_server(tmp_path: Path) -> None:
    server = _server(tmp_path, "pp2", **{"parallel.pp": 2})
    try:
        with httpx.Client() as client:
            _complete(client, server.url, random_prompts(seed=4, count=1)[0])
        _kill_child_and_expect_exit(server)
    finally:
        server.stop()


if __name__ == "__main__":
    print(json.dumps(_equality_run(sys.argv[1])))
