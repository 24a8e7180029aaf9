"""The synchronous engine: add_request / step / abort. A step is schedule -> run -> postprocess."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Collection
from collections.abc import Sequence as Seq
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from serving.config import ConfigError, DeploymentConfig
from serving.engine.attention import attn_implementation_name, implementation_name
from serving.engine.block_manager import BlockManager, kv_bytes_per_token, num_blocks_for_budget
from serving.engine.llama import LeanLlama
from serving.engine.model_runner import ModelRunner, kv_cache_layout, model_dtype
from serving.engine.outputs import EngineStats, RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence


class LLMEngine:
    """Owns scheduler, block manager and model runner for one model replica."""

    tokenizer: Any = None
    """Set by from_config; engines built from a bare model (tests) have none."""

    def __init__(
        self,
        config: DeploymentConfig,
        model: torch.nn.Module,
        *,
        eos_token_ids: Collection[int] = (),
        num_blocks: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """model must be loaded with attn_implementation=attn_implementation_name(config.attention);
        num_blocks overrides the count derived from cache.kv_cache_memory_gb (tests use tiny budgets)."""
        self.config = config
        self.model = model
        self.clock = clock
        self.max_model_len = config.model.max_model_len
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)  # type: ignore[operator]
        _use_attention(model, config)
        block_size = config.cache.block_size
        self.num_blocks = num_blocks if num_blocks is not None else self._blocks_from_budget(model)
        needed = -(-self.max_model_len // block_size)
        if self.num_blocks < needed:
            raise ConfigError(
                f"cache.kv_cache_memory_gb={config.cache.kv_cache_memory_gb} gives {self.num_blocks} KV "
                f"blocks of {block_size} tokens, fewer than the {needed} one request of model.max_model_len="
                f"{self.max_model_len} needs: raise cache.kv_cache_memory_gb or lower model.max_model_len"
            )
        self.block_manager = BlockManager(
            self.num_blocks, block_size, prefix_caching=config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config.scheduler,
            self.block_manager,
            max_model_len=self.max_model_len,
            eos_token_ids=eos_token_ids,
            clock=clock,
        )
        device = next(iter(model.parameters())).device
        self.runner = ModelRunner(
            model,
            attention=config.attention,
            num_blocks=self.num_blocks,
            block_size=block_size,
            device=device,
        )
        self._seq_ids = itertools.count()
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.last_step_seconds = 0.0
        self.last_step_idle = True
        """True when the last step scheduled nothing (static batch still gathering, or no work)."""

    def _blocks_from_budget(self, model: torch.nn.Module) -> int:
        num_layers, num_kv_heads, head_dim = kv_cache_layout(model)
        dtype_bytes = torch.empty((), dtype=model_dtype(model)).element_size()
        per_token = kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes)
        cache = self.config.cache
        return num_blocks_for_budget(cache.kv_cache_memory_gb, cache.block_size, per_token)

    @classmethod
    def from_config(cls, config: DeploymentConfig) -> LLMEngine:
        """Load tokenizer and model as the config says, size the KV cache from its memory budget: one
        process. serving.engine.factory.build_engine picks this or a tensor/pipeline-parallel engine."""
        from serving.engine.model_loader import load_engine_model, load_tokenizer, resolve_device

        if config.parallel.world_size > 1:
            raise ValueError(
                f"parallel dp x tp x pp = {config.parallel.world_size} ranks: LLMEngine.from_config builds "
                "one process; use serving.engine.factory.build_engine (or build_client for dp > 1)"
            )
        set_torch_threads()
        device = resolve_device(config.device)
        tokenizer = load_tokenizer(config.model)
        model = load_engine_model(config, device)
        engine = cls(config, model, eos_token_ids=eos_token_ids(model, tokenizer))
        engine.tokenizer = tokenizer
        return engine

    # --- requests ------------------------------------------------------------------------------

    def validate_request(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine could not run (so the step loop never sees it)."""
        check_request(prompt_token_ids, self.max_model_len, self.vocab_size)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.validate_request(prompt_token_ids, params)
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            priority=priority,
            arrival_time=self.clock() if arrival_time is None else arrival_time,
            seq_id=next(self._seq_ids),
        )
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks; its final (empty) output, or None when it was not running."""
        seq = self.scheduler.abort(request_id)
        self.runner.release(request_id)
        if seq is None:
            return None
        return RequestOutput(
            request_id=request_id,
            new_token_ids=[],
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            finished=True,
            finish_reason="abort",
        )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, append sampled tokens; returns the requests that got a token."""
        out = self.scheduler.schedule()
        self.last_step_idle = out.is_empty
        if out.is_empty:
            return []
        started = time.perf_counter()
        sampled = self.runner.execute(out)
        outputs = self.scheduler.postprocess(out, sampled)
        self.runner.logprobs.attach(outputs)
        self.last_step_seconds = time.perf_counter() - started
        self.account(outputs)
        return outputs

    def account(self, outputs: list[RequestOutput]) -> None:
        """Token counters for /metrics; a finished request's KV blocks go back to the pool."""
        for o in outputs:
            if o.num_output_tokens == 1:
                self.num_prompt_tokens_total += o.num_prompt_tokens
            if o.finished:
                self.runner.release(o.request_id)
        self.num_generation_tokens_total += len(outputs)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add engine-specific Prometheus families (parallel engines do; one process has none)."""

    def close(self) -> None:
        """Release what the engine holds outside this process (a parallel engine's worker ranks)."""

    def failure(self) -> str | None:
        """Why the engine can no longer serve although its step loop runs (a worker rank died), or None."""
        return None

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def generate(
        self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams]
    ) -> list[list[int]]:
        """Run prompts to completion (offline use, tests, benchmarks); output token ids in prompt order."""
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [f"generate-{next(self._seq_ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, all_params, strict=True):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for o in self.step():
                results[o.request_id].extend(o.new_token_ids)
        return [results[rid] for rid in ids]


def check_request(prompt_token_ids: Seq[int], max_model_len: int, vocab_size: int) -> None:
    """ValueError for a prompt no engine of this model could run; shared with the data-parallel front end,
    which refuses bad requests before routing them."""
    if not prompt_token_ids:
        raise ValueError("prompt is empty: send at least one token")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(
            f"prompt has {len(prompt_token_ids)} tokens; model.max_model_len={max_model_len} "
            "leaves no room for output: shorten the prompt"
        )
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


def _use_attention(model: torch.nn.Module, deployment: DeploymentConfig) -> None:
    """Point the model at our attention function when it was loaded with another one (a transformers
    model finds it registered under the name; the lean forward maps the name itself)."""
    config = getattr(model, "config", None)
    name = implementation_name(deployment.attention)
    if config is not None and getattr(config, "_attn_implementation", None) != name:
        if not isinstance(model, LeanLlama):
            attn_implementation_name(deployment.attention)
        model.set_attn_implementation(name)  # type: ignore[operator]


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """Stop ids from generation_config and the tokenizer (either may be missing)."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def set_torch_threads() -> None:
    """Use every core this process may run on (taskset/cgroups), not torch's guess."""
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
