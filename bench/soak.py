"""Soak and flood of the builtin server, each against a real `serving serve` (llama-tiny, its own process
group), printed as one JSON line per run.

soak:  N requests of mixed sizes (prompt 1-200 tokens, 1-64 output tokens, streamed or not, completions
       and chat, a few clients leaving mid-stream) at a fixed concurrency. Pass: no failure, every KV
       block free at the end, resident memory growth after warm-up under 5 %.
flood: N requests sent at once, server.max_waiting at the default and unbounded side by side. Reports
       answered / refused (429) / failed, the time to answer all, the server's memory before and after.

    .venv/bin/python bench/soak.py soak [--requests 10000] [--concurrency 32]
    .venv/bin/python bench/soak.py flood [--requests 2000] [--max-waiting 256,none]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving.config import DeploymentConfig
from serving.launch import ServerProcess

MODEL = "llama-tiny"
BASE = {
    "model.path": MODEL,
    "model.max_model_len": 512,
    "scheduler.max_num_seqs": 32,
    "cache.kv_cache_memory_gb": 0.05,
    "server.port": 0,
}
ERRORS: list[str] = []
"""The ends of bodies that carried an error event, reported with the soak's result."""
WARMUP_FRACTION = 0.1
"""Resident memory is compared from the end of warm-up (allocator pools, torch caches filled) to the end."""


def start(overrides: dict[str, Any], log_dir: Path) -> ServerProcess:
    server = ServerProcess(
        DeploymentConfig().replace(**{**BASE, **overrides}), log_path=log_dir / "server.log"
    )
    server.start()
    server.wait_healthy(180)
    return server


def tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def request_body(rng: random.Random) -> tuple[str, dict[str, Any], bool]:
    """(path, body, leave mid-stream) of one mixed request."""
    prompt = [rng.randrange(100, 30000) for _ in range(rng.randrange(1, 200))]
    common = {"model": MODEL, "max_tokens": rng.randrange(1, 64), "ignore_eos": rng.random() < 0.7}
    common["temperature"] = rng.choice([0.0, 0.7, 1.0])
    stream = rng.random() < 0.6
    leave = stream and rng.random() < 0.03
    if rng.random() < 0.5:
        return "/v1/completions", {**common, "prompt": prompt, "stream": stream}, leave
    text = " ".join(str(t) for t in prompt[:40])
    return (
        "/v1/chat/completions",
        {**common, "messages": [{"role": "user", "content": text}], "stream": stream},
        leave,
    )


async def one(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any], leave: bool) -> str:
    try:
        async with session.post(url + path, json=body) as reply:
            if reply.status != 200:
                return f"http_{reply.status}"
            if leave:
                await reply.content.readline()
                return "left"
            data = await reply.read()
            if body["stream"] and not data.rstrip().endswith(b"data: [DONE]"):
                return "truncated"
            if _has_error(data, body["stream"]):
                ERRORS.append(data[-600:].decode(errors="replace"))
                return "error_event"
            return "ok"
    except (aiohttp.ClientError, TimeoutError) as err:
        return type(err).__name__


def _has_error(data: bytes, stream: bool) -> bool:
    """An error event (`data: {"error": ...}`) or an error body; a token whose text is `error` is not."""
    if stream:
        return any(line.startswith(b'data: {"error"') for line in data.splitlines())
    return "error" in json.loads(data)


async def soak(url: str, pid: int, requests: int, concurrency: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    jobs = [request_body(rng) for _ in range(requests)]
    outcomes: dict[str, int] = {}
    warm = int(requests * WARMUP_FRACTION)
    rss: dict[str, int] = {"start": tree_rss(pid)}
    done = 0
    queue: asyncio.Queue[tuple[str, dict[str, Any], bool]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while not queue.empty():
            result = await one(session, url, *queue.get_nowait())
            outcomes[result] = outcomes.get(result, 0) + 1
            done += 1
            if done == warm:
                rss["warm"] = tree_rss(pid)

    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        took = time.monotonic() - started
        await asyncio.sleep(1.0)
        async with session.get(url + "/metrics") as reply:
            metrics = await reply.text()
    rss["end"] = tree_rss(pid)
    used = next(
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("serving_kv_cache_blocks_used ")
    )
    growth = (rss["end"] - rss["warm"]) / rss["warm"]
    ok = set(outcomes) <= {"ok", "left"} and used == 0 and growth < 0.05
    return {
        "test": "soak",
        "requests": requests,
        "concurrency": concurrency,
        "seconds": round(took, 1),
        "outcomes": outcomes,
        "kv_blocks_used_after": used,
        "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
        "rss_growth_after_warmup_pct": round(100 * growth, 2),
        "error_samples": ERRORS[:5],
        "pass": ok,
    }


async def flood(url: str, pid: int, requests: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 16, "ignore_eos": True}
    rss_before = tree_rss(pid)
    peak = rss_before
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, tree_rss(pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        results = await asyncio.gather(
            *(one(session, url, "/v1/completions", {**body, "stream": False}, False) for _ in range(requests))
        )
        took = time.monotonic() - started
        sampler.cancel()
    counts = {r: results.count(r) for r in set(results)}
    return {
        "test": "flood",
        "requests": requests,
        "seconds": round(took, 1),
        "outcomes": counts,
        "rss_mib": {
            "before": round(rss_before / 2**20, 1),
            "peak": round(peak / 2**20, 1),
            "after": round(tree_rss(pid) / 2**20, 1),
        },
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    flags: list[str] = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "sse4"))]
    return {
        "cpu": cpu,
        "isa": sorted(set(flags)),
        "cores": psutil.cpu_count(),
        "python": platform.python_version(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("test", choices=["soak", "flood"])
    parser.add_argument("--requests", type=int)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--max-waiting", default="256,none", help="flood: server.max_waiting values, side by side"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps({"machine": machine(), "load": [round(x, 1) for x in psutil.getloadavg()]}), flush=True)
    settings = (
        [None]
        if args.test == "soak"
        else [None if v == "none" else int(v) for v in args.max_waiting.split(",")]
    )
    passed = True
    for waiting in settings:
        overrides = {} if args.test == "soak" else {"server.max_waiting": waiting}
        with tempfile.TemporaryDirectory() as tmp:
            server = start(overrides, Path(tmp))
            try:
                assert server.pid is not None
                if args.test == "soak":
                    result = asyncio.run(
                        soak(server.url, server.pid, args.requests or 10000, args.concurrency, args.seed)
                    )
                    passed = passed and result["pass"]
                else:
                    result = asyncio.run(flood(server.url, server.pid, args.requests or 2000))
                    result["server.max_waiting"] = waiting
            finally:
                server.stop()
        print(json.dumps(result), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
