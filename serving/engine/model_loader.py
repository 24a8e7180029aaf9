"""Model and tokenizer loading for the builtin engine: local dirs, shipped models, hub ids from the cache.

`load_format: dummy` builds seeded random weights from config.json, as vLLM's `--load-format dummy`, so
performance is measured without downloading weights. Unlike vLLM's tiny uniform init (or transformers'
std 0.02), every matrix (linear and embedding) is drawn from N(0, std) with std = DUMMY_WEIGHT_GAIN /
sqrt(fan_in) (gain 1.5: std 0.066 for llama-57m's hidden-input matrices, 0.038 for its down_proj, 0.19
for llama-tiny). At small or fixed scales greedy decoding collapses onto one repeated token (a fixed std
of 0.05 did so on llama-tiny after ~10 tokens), and equality tests (paged vs reference attention, TP vs
one rank) would then pass for almost any bug; with this gain 32-64 greedy tokens are nearly all distinct
on both shipped models. Norm weights stay 1 and biases 0. Weights are drawn on the CPU in float32 from a
generator seeded by `model.seed`, then cast and moved, so the same seed gives the same model on every
process, device and dtype.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import nn

from serving.config import ConfigError, DeploymentConfig, DType, ModelConfig
from serving.engine.dummy_weights import DUMMY_WEIGHT_GAIN, draw_dummy  # noqa: F401 (re-exported)
from serving.engine.quantization import apply_quantization, check_parallel_quantization
from serving.engine.weight_layout import relayout_linear_weights

if TYPE_CHECKING:  # transformers is imported where used: the launcher resolves paths without it
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

TORCH_DTYPES: dict[DType, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

M = TypeVar("M", bound=nn.Module)

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def resolve_device(device: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """`auto` is CUDA when present, else the CPU; an explicit `cuda` without CUDA is a config error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device: use device=cpu or device=auto")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is invalid: choose 'auto', 'cpu' or 'cuda'")
    return torch.device(device)


def resolve_model_dir(path: str, field: str = "model.path") -> Path:
    """A local/shipped directory, or the cached snapshot of a hub id; never goes to the network."""
    local = ModelConfig(path=path).resolve_path()
    if local is not None:
        return local
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:  # a filesystem path, not `org/name`
        raise ConfigError(f"{field}={path!r}: no such directory; point it at a local Hugging Face model dir")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as err:
        raise ConfigError(
            f"{field}={path!r} is neither a local directory, a shipped model (llama-57m, llama-tiny) nor a "
            "hub id in the local Hugging Face cache (this machine does not download). Fix: run "
            f"`huggingface-cli download {path}` on a machine with internet and copy the cache "
            f"(HF_HOME), or set {field} to a local directory. ({type(err).__name__})"
        ) from None


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerFast:
    """The fast tokenizer of `model.tokenizer`, else of the model directory (offline)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    field = "model.tokenizer" if model.tokenizer else "model.path"
    directory = resolve_model_dir(model.tokenizer or model.path, field)
    try:
        tokenizer = _tokenizer_class(directory, AutoTokenizer).from_pretrained(
            directory, local_files_only=True
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field}={directory}: cannot load a tokenizer there: {err}") from None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ConfigError(
            f"{field}={directory}: got {type(tokenizer).__name__}, the engine needs a fast tokenizer "
            "(tokenizer.json)"
        )
    return tokenizer


def _tokenizer_class(directory: Path, auto: Any) -> Any:
    """PreTrainedTokenizerFast itself when tokenizer_config.json names it: AutoTokenizer would first import
    transformers' model registry (about 3 s of CPU of start-up here) to arrive at the same class."""
    from transformers import PreTrainedTokenizerFast

    path = directory / "tokenizer_config.json"
    named = json.loads(path.read_text()).get("tokenizer_class") if path.is_file() else None
    return PreTrainedTokenizerFast if named == "PreTrainedTokenizerFast" else auto


def load_model(
    config: DeploymentConfig, attn_implementation: str, device: torch.device, *, lean: bool = False
) -> PreTrainedModel:
    """The causal LM in eval mode on `device`, in `precision.dtype`, quantised per precision.quantization.

    lean=True: the engine's own forward (llama.py) when it supports the model and layout, else
    transformers' (the reason is logged); tests load the transformers reference with lean=False.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_parallel_quantization(config)
    model_cfg = config.model
    directory = resolve_model_dir(model_cfg.path)
    hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    check_max_model_len(model_cfg, hf_config)
    dtype = TORCH_DTYPES[config.precision.dtype]
    if model_cfg.load_format == "dummy":
        model = build_dummy_model(hf_config, attn_implementation, model_cfg.seed)
        nn.Module.to(model, dtype=dtype)
    else:
        _require_weights(directory)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
    model.requires_grad_(False)
    model.eval()
    nn.Module.to(model, device=device)
    if lean:
        model = _lean(model, config)
    return _finish(model, config, device)


def load_engine_model(config: DeploymentConfig, device: torch.device) -> nn.Module:
    """What the engine serves: the lean forward, built straight from the directory when it can (no
    transformers model classes imported: seconds of start-up), else through load_model(lean=True)."""
    from serving.engine.attention import attn_implementation_name, implementation_name
    from serving.engine.llama_loader import load_lean_direct

    check_parallel_quantization(config)
    directory = resolve_model_dir(config.model.path)
    hf = json.loads((directory / "config.json").read_text())
    limit = hf.get("max_position_embeddings")
    check_max_model_len(config.model, SimpleNamespace(max_position_embeddings=limit))  # type: ignore[arg-type]
    model = load_lean_direct(config, directory, hf)
    if model is None:
        return load_model(config, attn_implementation_name(config.attention), device, lean=True)
    model.set_attn_implementation(implementation_name(config.attention))
    model.requires_grad_(False)
    model.eval()
    nn.Module.to(model, dtype=TORCH_DTYPES[config.precision.dtype])
    nn.Module.to(model, device=device)
    return _finish(model, config, device)


def _finish(model: M, config: DeploymentConfig, device: torch.device) -> M:
    """Quantise, lay the float32 weights out for decode, compile: the steps every loaded model takes."""
    model = apply_quantization(model, config.precision, device, compiled=config.model.compile == "compiled")
    if _relayout(config, device):
        relayout_linear_weights(model)
    if config.model.compile == "compiled":
        _compile(model, config)
    return model


def _compile(model: nn.Module, config: DeploymentConfig) -> None:
    """Compile the lean step now (compiled.py), so start-up, not the first request, pays for it."""
    from serving.engine.compile_support import check_compile
    from serving.engine.compiled import WARMUP_TOKENS
    from serving.engine.llama import LeanLlama

    check_compile(config)
    if not isinstance(model, LeanLlama):
        raise ConfigError(
            f"model.compile='compiled' needs the engine's own Llama forward; {type(model).__name__} "
            f"({config.model.path}) runs transformers' forward: use model.compile=eager"
        )
    model.compile(WARMUP_TOKENS)


def _lean(model: PreTrainedModel, config: DeploymentConfig) -> PreTrainedModel:
    from serving.engine.llama_loader import from_transformers, lean_problem

    hf = model.config.to_dict()
    hf["architectures"] = [type(model).__name__]
    reason = lean_problem(hf)
    if reason is not None:
        logging.getLogger(__name__).info("transformers forward: %s", reason)
        return model
    lean: PreTrainedModel = from_transformers(model)  # type: ignore[assignment]
    return lean


def _relayout(config: DeploymentConfig, device: torch.device) -> bool:
    """float32 Linears on the CPU decode faster with [in, out] weight storage (see weight_layout.py).

    Not for tensor parallelism (DeepSpeed AutoTP re-slices the weights into contiguous shards after this),
    quantised linears (their own kernels), or GPUs (cuBLAS reads either layout at full speed).
    """
    return (
        device.type == "cpu"
        and config.parallel.tp == 1
        and config.precision.quantization == "none"
        and config.precision.dtype == "float32"
    )


def build_dummy_model(hf_config: PretrainedConfig, attn_implementation: str, seed: int) -> PreTrainedModel:
    """float32 CPU model, weights drawn by init_dummy_weights from a generator seeded with `seed`.

    transformers' own random init is skipped (no_init_weights): init_dummy_weights overwrites every
    parameter, and that init cost 0.6-1.8 s of CPU of the engine's start-up for llama-57m.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.random.fork_rng(devices=[]), no_init_weights():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            hf_config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    init_dummy_weights(model, seed)
    return model


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """dummy_weights.draw_dummy over the model's parameters (float32 on the CPU: build_dummy_model)."""
    draw_dummy({name: param.detach() for name, param in model.named_parameters()}, seed)


def check_max_model_len(model: ModelConfig, hf_config: PretrainedConfig) -> None:
    """The model's position table bounds model.max_model_len."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(limit, int) and model.max_model_len > limit:
        raise ConfigError(
            f"model.max_model_len={model.max_model_len} exceeds the model's max_position_embeddings={limit}: "
            f"use model.max_model_len <= {limit}"
        )


def _require_weights(directory: Path) -> None:
    if not any(next(directory.glob(pattern), None) for pattern in _WEIGHT_FILES):
        raise ConfigError(
            f"model.load_format='auto' but {directory} holds no weight files (*.safetensors/*.bin): "
            "use model.load_format=dummy or point model.path at a directory with weights"
        )
