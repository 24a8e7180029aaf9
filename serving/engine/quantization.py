"""Weight quantisation of a loaded model (`precision.quantization`), and which combinations run where.

Every option quantises all nn.Linear layers including the lm_head: at vocab 32000 x hidden 512 the lm_head
is the single largest matrix of llama-57m (16.4M of 57M parameters), so leaving it in float would keep
the biggest GEMV of each decode step unquantised. Embeddings stay as they are (a gather, not a GEMM).

| option           | library                                                 | runs on   | dtypes   |
|------------------|---------------------------------------------------------|-----------|----------|
| int8_dynamic     | eager: torch.ao quantize_dynamic (fbgemm)               | CPU       | float32  |
|                  | compiled: torchao Int8DynamicActivationInt8WeightConfig | CPU       | float32  |
| int8_weight_only | torchao Int8WeightOnlyConfig                            | CPU, CUDA | any      |
| int4_weight_only | torchao Int4WeightOnlyConfig, tinygemm                  | CUDA      | bfloat16 |
| bnb_int8         | bitsandbytes Linear8bitLt, threshold 0                  | CPU, CUDA | any      |
| bnb_nf4          | bitsandbytes Linear4bit, nf4                            | CPU, CUDA | any      |

int8_dynamic's library is chosen by measurement (`bench/int8_linears.py`, docs/benchmarks.md, Intel Xeon
with AMX, 2 cores, interleaved): eager, torch.ao's fbgemm Linear beats torchao's (torchao 2.0-4.0x slower
over the step's Linears at batch 1-32); compiled (model.compile), inductor leaves torch.ao's modules as
opaque calls (1.0x) but compiles torchao's int8 tensors into the frozen graph: torchao's Linears take
0.66x of torch.ao's time at batch 32, 0.8-0.9x at 8, 1.3x at 1, and whole compiled steps 0.81-0.99x of
eager int8_dynamic's.

Tensor parallelism (DeepSpeed AutoTP) shards nn.Linear layers; quantised layers are other module types, so
quantisation with parallel.tp > 1 is refused rather than silently left unsharded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from serving.config import ConfigError, DeploymentConfig, PrecisionConfig

M = TypeVar("M", bound=nn.Module)

INT4_GROUP_SIZE = 128
"""torchao int4 weight-only group size (hidden 512 and 1536 are multiples of it)."""


def check_precision_supported(config: DeploymentConfig) -> None:
    """Raise ConfigError, before any launch, when the precision options cannot run on the config's device."""
    if config.backend != "builtin":
        return  # other engines validate their own quantisation flags
    device_type = config.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    check_quantization(config.precision, device_type)
    check_parallel_quantization(config)


def check_parallel_quantization(config: DeploymentConfig) -> None:
    """AutoTP cannot shard quantised layers."""
    if config.precision.quantization != "none" and config.parallel.tp > 1:
        raise ConfigError(
            f"precision.quantization={config.precision.quantization!r} with "
            f"parallel.tp={config.parallel.tp}: "
            "tensor parallelism shards nn.Linear layers and quantised layers are not nn.Linear; use "
            "parallel.tp=1 or precision.quantization=none"
        )


def check_quantization(precision: PrecisionConfig, device_type: str) -> None:
    """The device/dtype rules of the table in the module docstring."""
    quant, dtype = precision.quantization, precision.dtype
    if quant == "int8_dynamic":
        if device_type != "cpu":
            raise ConfigError(
                "precision.quantization='int8_dynamic' (torch.ao dynamic int8, fbgemm kernels) runs on the "
                "CPU only: on cuda use int8_weight_only, bnb_int8 or bnb_nf4"
            )
        if dtype != "float32":
            raise ConfigError(
                "precision.quantization='int8_dynamic' needs precision.dtype='float32' (its quantised "
                f"Linear takes float32 activations), got precision.dtype={dtype!r}"
            )
    if quant == "int4_weight_only":
        if device_type != "cuda":
            raise ConfigError(
                "precision.quantization='int4_weight_only' (torchao) has no CPU kernel here: its plain/"
                "preshuffled formats need the CUDA kernel package mslk-cuda and its tinygemm format needs "
                "CUDA. It works on cuda with precision.dtype=bfloat16; on cpu use int8_dynamic or bnb_nf4"
            )
        if dtype != "bfloat16":
            raise ConfigError(
                "precision.quantization='int4_weight_only' (torchao tinygemm) needs "
                f"precision.dtype='bfloat16', got precision.dtype={dtype!r}"
            )


def apply_quantization(
    model: M, precision: PrecisionConfig, device: torch.device, compiled: bool = False
) -> M:
    """Quantise the Linear layers of `model` (already on `device`, in `precision.dtype`) in place;
    `compiled`: the model will run under torch.compile (model.compile=compiled), which picks int8_dynamic's
    library (the table above). Run outside inference_mode: torchao's weights made there fail to compile."""
    check_quantization(precision, device.type)
    quantize = _QUANTIZERS.get(precision.quantization)
    if compiled and precision.quantization in _COMPILED_QUANTIZERS:
        quantize = _COMPILED_QUANTIZERS[precision.quantization]
    if quantize is None:
        raise ConfigError(
            f"precision.quantization={precision.quantization!r} is unknown: choose one of "
            f"{', '.join(sorted(_QUANTIZERS))}"
        )
    with torch.no_grad():
        quantize(model, device)
    return model


def _none(model: nn.Module, device: torch.device) -> nn.Module:
    return model


def _int8_dynamic(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.ao dynamic int8: int8 weights, activations quantised per batch (fbgemm int8 GEMM, AVX2);
    the eager choice (compiled execution takes torchao's, _COMPILED_QUANTIZERS)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # deprecated in favour of torchao, but the fastest eager CPU path here
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def _torchao(config_factory: Callable[[], object]) -> Callable[[nn.Module, torch.device], nn.Module]:
    def quantize(model: nn.Module, device: torch.device) -> nn.Module:
        from torchao.quantization import quantize_

        quantize_(model, config_factory())  # type: ignore[arg-type]
        return model

    return quantize


def _int8_dynamic_config() -> object:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int8_weight_only_config() -> object:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int4_weight_only_config() -> object:
    from torchao.quantization import Int4WeightOnlyConfig

    # tinygemm's packed layout runs on CUDA without the extra mslk-cuda package the default format needs.
    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")


def _bnb(kind: str) -> Callable[[nn.Module, torch.device], nn.Module]:
    def quantize(model: nn.Module, device: torch.device) -> nn.Module:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _bnb_linear(child, kind, device))
        return model

    return quantize


def _bnb_linear(linear: nn.Linear, kind: str, device: torch.device) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weights; bitsandbytes quantises them on `.to(device)`."""
    import bitsandbytes as bnb

    weight = linear.weight.data.cpu()
    has_bias = linear.bias is not None
    layer: nn.Module
    if kind == "int8":
        # threshold 0: plain int8 GEMM without LLM.int8()'s fp16 outlier columns (the slow mixed path).
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=weight.dtype,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.cpu(), requires_grad=False)
    return layer.to(device)


_QUANTIZERS: dict[str, Callable[[nn.Module, torch.device], nn.Module]] = {
    "none": _none,
    "int8_dynamic": _int8_dynamic,
    "int8_weight_only": _torchao(_int8_weight_only_config),
    "int4_weight_only": _torchao(_int4_weight_only_config),
    "bnb_int8": _bnb("int8"),
    "bnb_nf4": _bnb("nf4"),
}

_COMPILED_QUANTIZERS: dict[str, Callable[[nn.Module, torch.device], nn.Module]] = {
    "int8_dynamic": _torchao(_int8_dynamic_config),
}
"""Where compiled execution takes another library for an option (measured, see the module docstring)."""
