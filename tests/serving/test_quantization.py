"""Each precision option on llama-tiny, CPU: logits close to float32, layers really quantised, or ConfigError.

Tolerance: cosine similarity of the full logits [8 positions x 32000] with the float32 model's logits.
Measured on this machine: bf16 0.9998, fp16 >= 0.99999, int8 options 0.9975-0.9997, bnb nf4 0.91-0.92
(4-bit error grows through the layers of a random-weight model). Two different seeds give ~0, so the bars
mean something.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from serving.config import ConfigError, DeploymentConfig
from serving.engine.model_loader import load_model
from serving.engine.quantization import check_precision_supported

CPU = torch.device("cpu")
PROMPT = torch.tensor([[31994, 1000, 2000, 3000, 4000, 5000, 6000, 7000]])
MIN_COSINE = {
    "none": 0.999,
    "int8_dynamic": 0.99,
    "int8_weight_only": 0.99,
    "bnb_int8": 0.99,
    "bnb_nf4": 0.85,
}
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8_dynamic", "int8_weight_only", "int4_weight_only", "bnb_int8", "bnb_nf4")
REFUSED_ON_CPU = {
    **{(dtype, "int4_weight_only"): r"int4_weight_only.*cuda.*bfloat16" for dtype in DTYPES},
    ("bfloat16", "int8_dynamic"): r"precision\.dtype='float32'.*precision\.dtype='bfloat16'",
    ("float16", "int8_dynamic"): r"precision\.dtype='float32'.*precision\.dtype='float16'",
}


def config(**flat: Any) -> DeploymentConfig:
    return DeploymentConfig().replace(**{"model.path": "llama-tiny", "device": "cpu", **flat})


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits.float().flatten()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return logits(load_model(config(), "sdpa", CPU))


def test_the_tolerance_discriminates(reference: torch.Tensor) -> None:
    other = logits(load_model(config(**{"model.seed": 1}), "sdpa", CPU))
    assert cosine(other, reference) < 0.5


def is_quantized(linear_like: nn.Module, quantization: str) -> bool:
    if quantization == "int8_dynamic":
        return type(linear_like).__module__.startswith("torch.ao.nn.quantized")
    if quantization.startswith("bnb_"):
        return type(linear_like).__module__.startswith("bitsandbytes")
    if quantization == "int8_weight_only":
        weight = linear_like.weight
        return type(weight) not in (torch.Tensor, nn.Parameter) and "torchao" in type(weight).__module__
    return isinstance(linear_like, nn.Linear) and linear_like.weight.dtype.is_floating_point


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_option_is_close_to_float32_or_refused(
    dtype: str, quantization: str, reference: torch.Tensor
) -> None:
    cfg = config(**{"precision.dtype": dtype, "precision.quantization": quantization})
    refusal = REFUSED_ON_CPU.get((dtype, quantization))
    if refusal is not None:
        with pytest.raises(ConfigError, match=refusal):
            check_precision_supported(cfg)
        with pytest.raises(ConfigError, match=refusal):
            load_model(cfg, "sdpa", CPU)
        return
    check_precision_supported(cfg)
    model = load_model(cfg, "sdpa", CPU)
    # Every projection and the lm_head are quantised, not silently left in float.
    layer = model.model.layers[0]
    for module in (layer.self_attn.q_proj, layer.mlp.down_proj, model.lm_head):
        assert is_quantized(module, quantization), f"{type(module).__name__} not quantised by {quantization}"
    out = logits(model)
    similarity = cosine(out, reference)
    assert similarity >= MIN_COSINE[quantization], f"cosine {similarity:.5f} for {dtype}/{quantization}"
    if (dtype, quantization) != ("float32", "none"):
        assert not torch.equal(out, reference), "a lossy option gave bit-identical logits: was it applied?"


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"device": "cuda", "precision.quantization": "int8_dynamic"}, r"int8_dynamic.*CPU only"),
        ({"device": "cuda", "precision.quantization": "int4_weight_only"}, r"precision\.dtype='bfloat16'"),
        (
            {"parallel.tp": 2, "precision.quantization": "int8_dynamic"},
            r"precision\.quantization='int8_dynamic' with parallel\.tp=2",
        ),
    ],
)
def test_check_precision_supported_refuses_by_name(flat: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_precision_supported(config(**flat))


def test_load_model_refuses_quantised_tensor_parallel() -> None:
    cfg = config(**{"parallel.tp": 2, "precision.quantization": "bnb_int8"})
    with pytest.raises(ConfigError, match=r"parallel\.tp=2"):
        load_model(cfg, "sdpa", CPU)


def test_check_precision_supported_accepts_cuda_options_without_a_gpu() -> None:
    """The tuner checks a CUDA config on any machine; these combinations are valid there."""
    for flat in (
        {"precision.quantization": "int8_weight_only"},
        {"precision.quantization": "bnb_nf4", "precision.dtype": "float16"},
        {"precision.quantization": "int4_weight_only", "precision.dtype": "bfloat16"},
    ):
        check_precision_supported(config(device="cuda", **flat))


def test_other_backends_are_not_checked_here() -> None:
    check_precision_supported(config(backend="vllm", **{"precision.quantization": "int4_weight_only"}))
