"""Which engine serves a deployment: decided here, and only here, from config.parallel.

  dp > 1          DataParallelEngine: this process is the HTTP front end, each replica a child process
                  that builds its own engine with build_engine (distributed/replica.py)
  tp > 1          TensorParallelEngine: rank 0 here, ranks 1.. spawned (distributed/worker.py)
  pp > 1          PipelineEngine: stage 0 here, the other stages spawned
  otherwise       LLMEngine in this process
The engine modules import downward only (distributed/ on llm_engine, never the reverse), so this is the
one module that knows them all.
"""

from __future__ import annotations

from serving.config import DeploymentConfig
from serving.engine.async_engine import AsyncEngine
from serving.engine.client import EngineClient
from serving.engine.distributed.data_parallel import DataParallelEngine
from serving.engine.distributed.pipeline_engine import PipelineEngine
from serving.engine.distributed.rank_group import start_rank_group
from serving.engine.distributed.tp_engine import TensorParallelEngine
from serving.engine.llm_engine import LLMEngine


def build_engine(config: DeploymentConfig) -> LLMEngine:
    """One replica's synchronous engine, its worker ranks (if any) spawned and ready; blocking."""
    parallel = config.parallel
    if parallel.dp > 1:
        raise ValueError(f"parallel.dp={parallel.dp}: a replica is one of dp; use build_client")
    if parallel.tp == 1 and parallel.pp == 1:
        return LLMEngine.from_config(config)
    group, part, tokenizer = start_rank_group(config)
    engine_class = TensorParallelEngine if parallel.tp > 1 else PipelineEngine
    engine = engine_class(config, part, tokenizer, group)
    group.wait_ready()
    return engine


def build_client(config: DeploymentConfig) -> EngineClient:
    """What the HTTP server drives: dp replicas behind a front end, or build_engine's engine stepped in a
    thread. Blocking (models load): call before the event loop serves."""
    if config.parallel.dp > 1:
        return DataParallelEngine.from_config(config)
    engine = build_engine(config)
    return AsyncEngine(engine, tokenizer=engine.tokenizer, model_name=config.model.name)
