"""DeploymentConfig: the one schema shared by search spaces, MLflow params, best.yaml and `serving launch`.

Every section is a frozen dataclass checked at construction; errors name the field and the fix.
Unknown keys are rejected by name, because a misspelled knob in a tuner is a silently wrong result.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from serving.dotted import closest_key, flatten, unknown_key_message  # noqa: F401 (re-exported)
from serving.schema import ConfigError, build, coerce, nest, require, type_hints

SHIPPED_MODELS_DIR = Path(__file__).parent / "models"
"""Model configs shipped with the package, addressable by bare name (`model.path: llama-57m`)."""

Backend = Literal["builtin", "vllm", "sglang"]
LoadFormat = Literal["auto", "dummy"]
DType = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["none", "int8_dynamic", "int8_weight_only", "int4_weight_only", "bnb_int8", "bnb_nf4"]
AttentionBackend = Literal["eager", "sdpa", "paged"]
SchedulingPolicy = Literal["request", "static", "continuous"]
QueueOrder = Literal["fcfs", "priority", "sjf"]
DpRouting = Literal["least_outstanding", "round_robin"]
AllReduce = Literal["auto", "shm", "process_group"]
Device = Literal["auto", "cpu", "cuda"]

API_KEY_ENV = "SERVING_API_KEY"
"""Where a server finds its API key when server.api_key is null or redacted."""
REDACTED = "<redacted>"
"""What every stored or shown form of a DeploymentConfig holds in place of a secret."""
SECRET_KEYS = frozenset({"server.api_key"})


@dataclass(frozen=True)
class ModelConfig:
    path: str = "llama-57m"
    """A local Hugging Face directory, a model shipped in serving/models, or a hub id in the local cache."""
    load_format: LoadFormat = "dummy"
    """`auto` reads the weights; `dummy` builds seeded random weights from config.json (as vLLM's)."""
    seed: int = 0
    """Seed for dummy weights, so every trial measures the same model."""
    max_model_len: int = 1024
    """Longest prompt + output, in tokens; longer requests are refused with a 400."""
    served_model_name: str | None = None
    """The name clients send in `model`; defaults to the directory's name."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not the model directory."""
    compile: Literal["eager", "compiled"] | None = None
    """`compiled`: torch.compile (inductor) of the step, slower start-up for faster steps (builtin: tp = pp
    = 1, no quantization); vLLM compiles unless `eager` (--enforce-eager). null: the engine's default."""

    def __post_init__(self) -> None:
        require(self.max_model_len >= 16, "model.max_model_len", self.max_model_len, "use at least 16")

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.path).name

    def resolve_path(self) -> Path | None:
        """The local directory this model lives in, or None when it must come from the hub cache."""
        local = Path(self.path).expanduser()
        if local.is_dir():
            return local
        shipped = SHIPPED_MODELS_DIR / self.path
        return shipped if shipped.is_dir() else None


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1
    """Data-parallel replicas behind one front end."""
    tp: int = 1
    """Tensor-parallel ranks per replica (DeepSpeed AutoTP in the builtin engine)."""
    pp: int = 1
    """Pipeline stages per replica (contiguous decoder-layer ranges)."""
    oversubscribe: bool = False
    """Allow more ranks than devices (CPU cores or GPUs)."""
    dp_routing: DpRouting = "least_outstanding"
    """How the front end picks a replica: fewest unfinished requests (ties in turn), or strict turns."""
    allreduce: AllReduce = "auto"
    """Builtin tensor parallel's all-reduce: DeepSpeed's shared-memory op (`shm`, fast but it spins while
    it waits), torch.distributed's process group (`process_group`, gloo on CPU), or `auto`: shm when every
    rank has cores of its own, else the process group."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            require(value >= 1, f"parallel.{name}", value, "use a positive integer")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass(frozen=True)
class PrecisionConfig:
    dtype: DType = "float32"
    """Activation and weight dtype before quantisation."""
    quantization: Quantization = "none"
    """Weight quantisation: torch.ao int8 dynamic, torchao int8/int4 weight-only, bitsandbytes int8/nf4."""


@dataclass(frozen=True)
class SchedulerConfig:
    policy: SchedulingPolicy = "continuous"
    """`request`: one at a time; `static`: batch runs to completion; `continuous`: iteration-level (Orca)."""
    queue_order: QueueOrder = "fcfs"
    """Order of the waiting queue: arrival, request priority (lower first), shortest prompt first."""
    max_num_seqs: int = 32
    """Most sequences in one batch."""
    max_num_batched_tokens: int = 2048
    """Most tokens (prefill + decode) computed in one step."""
    chunked_prefill: bool = False
    """Split long prefills across steps so decodes keep flowing (continuous policy only)."""
    batch_wait_ms: float = 10.0
    """Static policy: how long to gather a batch before running it."""

    def __post_init__(self) -> None:
        require(self.max_num_seqs >= 1, "scheduler.max_num_seqs", self.max_num_seqs, "use at least 1")
        require(
            self.max_num_batched_tokens >= 16,
            "scheduler.max_num_batched_tokens",
            self.max_num_batched_tokens,
            "use at least 16",
        )
        require(self.batch_wait_ms >= 0, "scheduler.batch_wait_ms", self.batch_wait_ms, "use >= 0")
        if self.chunked_prefill and self.policy != "continuous":
            raise ConfigError(
                "scheduler.chunked_prefill=true needs scheduler.policy=continuous, "
                f"got policy={self.policy!r}"
            )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory_gb: float = 1.0
    """Memory budget for KV blocks (per replica); the block count follows from it."""
    enable_prefix_caching: bool = True
    """Share full KV blocks by content across requests (vLLM's automatic prefix caching, on by default
    there too): a prompt prefix already computed, such as chat's system prompt, is not computed again.
    vLLM: --enable-prefix-caching / --no-enable-prefix-caching; SGLang: its radix cache."""

    def __post_init__(self) -> None:
        require(
            self.block_size in (8, 16, 32, 64, 128),
            "cache.block_size",
            self.block_size,
            "use 8-128, power of 2",
        )
        require(self.kv_cache_memory_gb > 0, "cache.kv_cache_memory_gb", self.kv_cache_memory_gb, "use > 0")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Bind address; loopback by default."""
    port: int = 8000
    """TCP port; 0 picks a free one."""
    log_level: str = "warning"
    """uvicorn log level."""
    max_waiting: int | None = 256
    """Most generation requests admitted beyond those the engine runs at once (parallel.dp x
    scheduler.max_num_seqs; one per replica under scheduler.policy=request). One more is refused at once
    with 429 and Retry-After, before its body is read, so a flood costs no memory. null: unbounded. The
    builtin server's bound: an external engine (vllm, sglang) queues as it does."""
    request_timeout_s: float | None = None
    """Deadline of one generation request from its arrival: past it the request is aborted (its KV
    blocks freed) and answered 504, or ends with an error event once streaming. null: none."""

    api_key: str | None = None
    """Clients must send `Authorization: Bearer <key>` to /v1/* (the OpenAI client's convention). null:
    $SERVING_API_KEY when set, else no key. A secret: every stored or shown form (MLflow params,
    best.yaml, logs) holds '<redacted>', which a server reads back as $SERVING_API_KEY."""

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "server.port", self.port, "use 0-65535")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("server.api_key is empty: give a key, or null for none")
        if self.max_waiting is not None:
            require(self.max_waiting >= 0, "server.max_waiting", self.max_waiting, "use >= 0, or null")
        if self.request_timeout_s is not None:
            require(
                self.request_timeout_s > 0,
                "server.request_timeout_s",
                self.request_timeout_s,
                "use a positive number of seconds, or null",
            )


@dataclass(frozen=True)
class DeploymentConfig:
    """One deployment: what the tuner samples, MLflow logs, best.yaml stores and `serving launch` runs."""

    backend: Backend = "builtin"
    """Serving engine: our builtin engine, vLLM or SGLang."""
    device: Device = "auto"
    """`auto` uses CUDA when it is present, else the CPU."""
    attention: AttentionBackend = "paged"
    """Attention implementation over the paged KV cache."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    engine_args: str = ""
    """Extra flags for an external engine (vllm, sglang), shell-split (`--enforce-eager`). They may add
    engine options, never override one a field above maps; the builtin engine takes none. A field, not an
    environment variable, so a study logs it and best.yaml launches what was measured."""
    engine_python: str | None = None
    """The external engine's interpreter; null: $SERVING_VLLM_PYTHON / $SERVING_SGLANG_PYTHON when set
    (where an engine is installed is a fact of the machine), else the project's .venv-vllm / .venv-sglang."""

    def __post_init__(self) -> None:
        try:
            shlex.split(self.engine_args)
        except ValueError as err:
            raise ConfigError(
                f"engine_args={self.engine_args!r} cannot be shell-split ({err}): balance its quotes"
            ) from None
        if self.engine_python is not None and not self.engine_python.strip():
            raise ConfigError(
                f"engine_python={self.engine_python!r} names no interpreter: give a path, or null"
            )
        if self.scheduler.max_num_batched_tokens < self.scheduler.max_num_seqs:
            raise ConfigError(
                "scheduler.max_num_batched_tokens must be >= scheduler.max_num_seqs, got "
                f"({self.scheduler.max_num_batched_tokens}, {self.scheduler.max_num_seqs})"
            )
        if (
            not self.scheduler.chunked_prefill
            and self.scheduler.max_num_batched_tokens < self.model.max_model_len
        ):
            raise ConfigError(
                f"scheduler.max_num_batched_tokens={self.scheduler.max_num_batched_tokens} is below "
                f"model.max_model_len={self.model.max_model_len}: a long prompt could never be scheduled; "
                "raise it or set scheduler.chunked_prefill=true"
            )

    # --- conversions -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeploymentConfig:
        """Build from nested mappings, rejecting unknown keys and wrongly typed values by name."""
        return build(cls, data, prefix="")

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> DeploymentConfig:
        """Build from dotted keys (`scheduler.max_num_seqs: 8`), as search spaces and MLflow params use."""
        return cls.from_dict(nest(flat))

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentConfig:
        """Read a deployment YAML; a best.yaml's `deployment:` section is accepted as well."""
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        if "deployment" in data and isinstance(data["deployment"], dict):
            data = data["deployment"]
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values, secrets redacted: what is stored or shown (the live key stays in the
        object, e.g. config.server.api_key)."""
        return nest(self.to_flat())

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys to plain values, secrets redacted: the MLflow params of a trial."""
        flat = flatten(dataclasses.asdict(self))
        for key in SECRET_KEYS:
            if flat[key] is not None:
                flat[key] = REDACTED
        return flat

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **flat_overrides: Any) -> DeploymentConfig:
        """A copy with dotted-key overrides applied (`cfg.replace(**{"parallel.tp": 2})`)."""
        flat = flatten(dataclasses.asdict(self))  # secrets kept: the copy serves with the same key
        for key in flat_overrides:
            if key not in flat:
                raise ConfigError(unknown_key_message(key, flat))
        flat.update(flat_overrides)
        return DeploymentConfig.from_flat(flat)


def field_types() -> dict[str, Any]:
    """The annotation of every dotted key (`scheduler.max_num_seqs` -> int): what a search space may set."""
    types_by_key: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint) and isinstance(hint, type):
                walk(hint, f"{prefix}{f.name}.")
            else:
                types_by_key[f"{prefix}{f.name}"] = hint

    walk(DeploymentConfig, "")
    return types_by_key


def check_field(key: str, value: Any) -> None:
    """Check one value against its key's type as DeploymentConfig would (ConfigError naming key and fix),
    without building a whole config: search spaces check each choice where it is written."""
    types_by_key = field_types()
    if key not in types_by_key:
        raise ConfigError(unknown_key_message(key, types_by_key))
    coerce(types_by_key[key], value, key)
