"""The SGLang backend: a DeploymentConfig as `python -m sglang.launch_server` flags and environment.

Flags checked against SGLang's python/sglang/srt/server_args.py (ServerArgs; sgl-project/sglang at
001067f). SGLang lives in its own venv: the deployment's engine_python, else $SERVING_SGLANG_PYTHON, else
<repo>/.venv-sglang/bin/python. Extra flags are the deployment's engine_args ("--disable-cuda-graph");
no mapped flag twice.
SGLang has no KV budget in bytes: cache.kv_cache_memory_gb becomes --max-total-tokens (the token pool)
from the model's geometry. Knobs SGLang does not have are refused by validate(), naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence

from serving.backends.engine_support import (
    REPO_ROOT,
    ExternalEngineBackend,
    kv_bytes_per_token,
    model_location,
    omp_bind_mask,
    require_executable,
    tokenizer_location,
    uses_cpu,
)
from serving.config import ConfigError, DeploymentConfig

PYTHON_ENV = "SERVING_SGLANG_PYTHON"
EXTRA_ARGS_ENV = "SERVING_SGLANG_EXTRA_ARGS"
DEFAULT_PYTHON = REPO_ROOT / ".venv-sglang" / "bin" / "python"
ENTRYPOINT = "sglang.launch_server"

ATTENTION = {"sdpa": "torch_native"}
"""Our attention names SGLang has under another name; `paged` leaves SGLang's own pick (FlashInfer, FA3,
Intel AMX...): every SGLang backend reads its paged token pool."""
DP_ROUTING = {"least_outstanding": "total_requests", "round_robin": "round_robin"}
"""parallel.dp_routing -> --load-balance-method."""
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class SGLangBackend(ExternalEngineBackend):
    name = "sglang"
    python_env = PYTHON_ENV
    extra_args_env = EXTRA_ARGS_ENV
    default_python = DEFAULT_PYTHON
    entrypoint = ENTRYPOINT
    api_key_env = None

    title = "SGLang"
    log_levels = LOG_LEVELS
    log_level_flag = "--log-level"
    no_sjf = (
        "SGLang's --schedule-policy has no shortest-prompt-first (it has fcfs, lpm, lof, random, "
        "dfs-weight); use fcfs or priority"
    )

    def engine_problems(self, config: DeploymentConfig) -> list[str]:
        """SGLang attends over its paged pool or with torch_native; it quantises in flight to fp8 only."""
        problems = []
        if config.attention == "eager":
            problems.append("attention='eager': SGLang has no unfused attention; use paged or sdpa")
        if config.precision.quantization != "none":
            problems.append(
                f"precision.quantization={config.precision.quantization!r}: SGLang quantises in flight only "
                "to fp8 (not a DeploymentConfig choice); int8/int4/bitsandbytes need a pre-quantised "
                "checkpoint; use precision.quantization=none"
            )
        try:
            kv_pool_tokens(config)
        except ConfigError as err:
            problems.append(str(err).removeprefix("backend 'sglang': "))
        return problems

    def engine_args(self, config: DeploymentConfig, port: int) -> list[str]:
        """The DeploymentConfig as SGLang ServerArgs flags (every field is here or refused by validate())."""
        model, par, sched = config.model, config.parallel, config.scheduler
        args = [
            "--model-path", model_location(config),
            "--served-model-name", model.name,
            "--load-format", model.load_format,
            "--random-seed", str(model.seed),
            "--context-length", str(model.max_model_len),
            "--tp-size", str(par.tp),
            "--pp-size", str(par.pp),
            "--dp-size", str(par.dp),
            "--load-balance-method", DP_ROUTING[par.dp_routing],
            "--dtype", config.precision.dtype,
            "--max-running-requests", str(sched.max_num_seqs),
            "--max-prefill-tokens", str(sched.max_num_batched_tokens),
            "--chunked-prefill-size", str(sched.max_num_batched_tokens if sched.chunked_prefill else -1),
            "--schedule-policy", "fcfs",
            "--page-size", str(config.cache.block_size),
            "--max-total-tokens", str(kv_pool_tokens(config)),
            "--host", config.server.host,
            "--port", str(port),
            "--log-level", config.server.log_level,
            "--enable-metrics",
        ]  # fmt: skip
        if not config.cache.enable_prefix_caching:  # SGLang's radix cache is its prefix cache, on by default
            args.append("--disable-radix-cache")
        if sched.queue_order == "priority":  # lower value first, as the builtin engine and vLLM
            args += ["--enable-priority-scheduling", "--schedule-low-priority-values-first"]
        tokenizer = tokenizer_location(config)
        if tokenizer is not None:
            args += ["--tokenizer-path", tokenizer]
        if config.attention in ATTENTION:
            args += ["--attention-backend", ATTENTION[config.attention]]
        if config.device != "auto":
            args += ["--device", config.device]
        if model.compile == "compiled":  # SGLang runs eagerly by default (null and `eager`)
            args.append("--enable-torch-compile")
        return args

    def env(self, config: DeploymentConfig, cpus: Sequence[int] | None) -> dict[str, str]:
        """On CPU: SGLang's CPU engine and one OpenMP core list per rank."""
        require_executable(self.python_for(config), self.name, PYTHON_ENV, "install sglang into .venv-sglang")
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if uses_cpu(config):
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            env["SGLANG_CPU_OMP_THREADS_BIND"] = omp_bind_mask(config, cpus)
        return env


def kv_pool_tokens(config: DeploymentConfig) -> int:
    """--max-total-tokens: how many tokens cache.kv_cache_memory_gb holds for this model and dtype."""
    tokens = int(config.cache.kv_cache_memory_gb * 2**30 // kv_bytes_per_token(config))
    if tokens < config.model.max_model_len:
        raise ConfigError(
            f"backend 'sglang': cache.kv_cache_memory_gb={config.cache.kv_cache_memory_gb} holds {tokens} "
            f"tokens, fewer than model.max_model_len={config.model.max_model_len}; raise it"
        )
    return tokens
