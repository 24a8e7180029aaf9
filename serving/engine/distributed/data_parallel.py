"""Data parallelism: dp engine replicas (child processes, each with its own cores or GPUs) behind the one
HTTP front end, which serves them through this EngineClient.

The front end keeps the HTTP work (parsing, tokenising, SSE) and routes each request to a replica: by
least outstanding requests (ties in turn), or round-robin (parallel.dp_routing). Per step a replica sends
one message holding every new token of that step, so a token costs one pickled list entry on a local
pipe, not an HTTP hop. /metrics re-exports each replica's engine metrics with a `replica` label.
A replica that dies makes is_healthy() False at once and ends the server with EXIT_RANK_DIED.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from serving.config import DeploymentConfig
from serving.engine.distributed.placement import split_cpus, split_gpus, visible_gpus
from serving.engine.distributed.process import CONFIG_ENV, CPUS_ENV, Child, Watchdog, spawn, stop_children
from serving.engine.distributed.validate import validate_for_launch
from serving.engine.llm_engine import check_request
from serving.engine.output_streams import EngineDeadError, OutputStreams
from serving.engine.outputs import EngineStats, RequestOutput
from serving.engine.sampling_params import SamplingParams

log = logging.getLogger("serving")

REPLICA_MODULE = "serving.engine.distributed.replica"


class Replica:
    """The front end's view of one replica: its process, what it is running, its last metrics."""

    def __init__(self, index: int, child: Child) -> None:
        self.index = index
        self.child = child
        self.outstanding: set[str] = set()
        self.metrics_text = ""
        self.stats = EngineStats(0, 0, 0, 0, 0)
        self.vocab_size = 0


class DataParallelEngine(OutputStreams):
    """EngineClient over dp replica processes (see serving/engine/client.py)."""

    def __init__(self, config: DeploymentConfig, replicas: list[Replica], tokenizer: Any) -> None:
        super().__init__()
        self.config = config
        self.replicas = replicas
        self.tokenizer = tokenizer
        self.model_name = config.model.name
        self.max_model_len = config.model.max_model_len
        self.vocab_size = min(r.vocab_size for r in replicas)
        self.routing = config.parallel.dp_routing
        self.registry = CollectorRegistry()
        self.registry.register(ReplicaCollector(self))
        self._turn = itertools.count()
        self._where: dict[str, Replica] = {}
        self._dead: str | None = None
        self._stopping = False
        self.watchdog: Watchdog | None = None

    @classmethod
    def from_config(cls, config: DeploymentConfig) -> DataParallelEngine:
        """Spawn the replicas (each loads its model in parallel) and wait until all are ready."""
        from serving.engine.model_loader import load_tokenizer, resolve_device

        validate_for_launch(config)
        dp = config.parallel.dp
        replica_config = config.replace(**{"parallel.dp": 1})
        yaml_text = replica_config.to_yaml()
        cpu_shares = split_cpus(list(os.sched_getaffinity(0)), dp)
        gpu_shares: list[list[str]] | None = None
        if resolve_device(config.device).type == "cuda":
            gpu_shares = split_gpus(visible_gpus(), dp)
        replicas = []
        for i in range(dp):
            env = {
                CONFIG_ENV: yaml_text,
                CPUS_ENV: ",".join(map(str, cpu_shares[i])),
                "OMP_NUM_THREADS": str(len(cpu_shares[i])),
                "TOKENIZERS_PARALLELISM": "false",
            }
            if gpu_shares is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_shares[i])
            replicas.append(Replica(i, spawn(f"replica {i}", REPLICA_MODULE, env)))
        log.info("data parallel: %d replicas on cpus %s", dp, cpu_shares)
        tokenizer = load_tokenizer(config.model)
        try:
            for replica in replicas:
                replica.vocab_size = _wait_ready(replica)
        except BaseException:
            stop_children([r.child for r in replicas], None)
            raise
        engine = cls(config, replicas, tokenizer)
        engine.watchdog = Watchdog(
            [r.child for r in replicas], on_death=lambda child: engine._mark_dead(child.name)
        )
        engine.watchdog.start()
        return engine

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._bind_loop()
        for replica in self.replicas:
            threading.Thread(
                target=self._read, args=(replica,), name=f"replica-{replica.index}-reader", daemon=True
            ).start()

    async def shutdown(self) -> None:
        self._stopping = True
        await asyncio.to_thread(stop_children, [r.child for r in self.replicas], self.watchdog)
        self._fail_all(EngineDeadError("engine shut down"))

    def is_healthy(self) -> bool:
        return self._dead is None and not self._stopping

    def stats(self) -> EngineStats:
        s = [r.stats for r in self.replicas]
        return EngineStats(
            num_waiting=sum(x.num_waiting for x in s),
            num_running=sum(x.num_running for x in s),
            kv_blocks_used=sum(x.kv_blocks_used for x in s),
            kv_blocks_total=sum(x.kv_blocks_total for x in s),
            num_preemptions=sum(x.num_preemptions for x in s),
        )

    # --- requests ------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncGenerator[RequestOutput, None]:
        """As AsyncEngine.generate: one RequestOutput per step with new tokens; ValueError up front."""
        if not self.is_healthy():
            raise EngineDeadError(f"engine is not running: {self._dead or 'shut down'}")
        check_request(prompt_token_ids, self.max_model_len, self.vocab_size)
        queue = self._open(request_id)
        replica = self._route()
        self._where[request_id] = replica
        replica.outstanding.add(request_id)
        replica.child.send(("add", request_id, list(prompt_token_ids), params, priority, time.monotonic()))

        def abandon() -> None:
            if self.is_healthy():
                replica.child.send(("abort", request_id))

        try:
            async with contextlib.aclosing(self._stream(request_id, queue, abandon)) as stream:
                async for item in stream:
                    yield item
        finally:
            self._where.pop(request_id, None)
            replica.outstanding.discard(request_id)

    async def abort(self, request_id: str) -> None:
        replica = self._where.get(request_id)
        if replica is not None and self.is_healthy():
            replica.child.send(("abort", request_id))

    def _route(self) -> Replica:
        turn = next(self._turn)
        n = len(self.replicas)
        if self.routing == "round_robin":
            return self.replicas[turn % n]
        order = [self.replicas[(turn + i) % n] for i in range(n)]
        return min(order, key=lambda r: len(r.outstanding))

    # --- replies (reader threads -> event loop) -----------------------------------------------

    def _read(self, replica: Replica) -> None:
        conn = replica.child.conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "out":
                self._post(self._dispatch, message[1])
            elif kind == "error":
                self._post(self._deliver, message[1], ValueError(message[2]))
            elif kind == "metrics":
                replica.metrics_text, replica.stats = message[1], message[2]

    def _mark_dead(self, name: str) -> None:
        """Watchdog thread: a replica died (the process exits right after)."""
        self._dead = f"{name} died"
        self._post(self._fail_all, EngineDeadError(self._dead))


def _wait_ready(replica: Replica) -> int:
    """Block until the replica has loaded its model; RuntimeError if it exits first."""
    conn, proc = replica.child.conn, replica.child.proc
    while not conn.poll(0.2):
        if proc.poll() is not None:
            raise RuntimeError(f"replica {replica.index} exited with code {proc.returncode} while loading")
    kind, vocab_size = conn.recv()
    if kind != "ready":
        raise RuntimeError(f"replica {replica.index} sent {kind!r} before 'ready'")
    return int(vocab_size)


class ReplicaCollector(Collector):
    """Every replica's last metrics with a `replica` label, plus the front end's routing state."""

    def __init__(self, engine: DataParallelEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for replica in self.engine.replicas:
            for family in text_string_to_metric_families(replica.metrics_text):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    labels = {"replica": str(replica.index), **sample.labels}
                    out.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
        yield from merged.values()
        outstanding = GaugeMetricFamily(
            "serving_dp_outstanding_requests",
            "Requests routed to each replica and not finished",
            labels=["replica"],
        )
        for replica in self.engine.replicas:
            outstanding.add_metric([str(replica.index)], len(replica.outstanding))
        yield outstanding
        replicas = GaugeMetricFamily("serving_dp_replicas", "Data-parallel replicas behind this front end")
        replicas.add_metric([], len(self.engine.replicas))
        yield replicas
