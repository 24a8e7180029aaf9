"""Which deployments the builtin engine can run compiled (`model.compile: compiled`); torch-free, so the
launcher and the tuner check a config before anything starts."""

from __future__ import annotations

from serving.config import ConfigError, DeploymentConfig

COMPILED_QUANTIZATIONS = ("none", "int8_dynamic")
"""precision.quantization values the compiled step runs (and the greedy tests cover)."""


def check_compile(config: DeploymentConfig) -> None:
    """ConfigError naming the field and the fix when compiled execution cannot serve this deployment.

    The compiled step is the lean forward of one process (serving/engine/compiled.py): tensor-parallel
    ranks all-reduce inside the step and pipeline stages call the decoder stage by stage (both run the lean
    forward eagerly; compiling them is not built or tested yet). Of the quantisations, int8_dynamic
    compiles (through torchao's int8 tensors, quantization.py); the others are untested under inductor.
    """
    if config.model.compile != "compiled":
        return
    parallel, quant = config.parallel, config.precision.quantization
    if parallel.tp > 1 or parallel.pp > 1:
        raise ConfigError(
            f"model.compile='compiled' with parallel.tp={parallel.tp}, parallel.pp={parallel.pp}: the "
            "builtin engine compiles one-process replicas only; use parallel.tp=1 and parallel.pp=1 "
            "(dp may be > 1), or model.compile=eager"
        )
    if quant not in COMPILED_QUANTIZATIONS:
        raise ConfigError(
            f"model.compile='compiled' with precision.quantization={quant!r}: the builtin engine compiles "
            f"precision.quantization in {COMPILED_QUANTIZATIONS} only; use one of those "
            "(precision.dtype=bfloat16 for speed) or model.compile=eager"
        )
