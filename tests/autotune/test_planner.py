"""Memory planner and layout rules, on the shipped model shapes and hand-built device descriptions."""

from __future__ import annotations

import pytest
import torch
import transformers

from autotune.config.settings import PlannerSettings
from autotune.space.constraints import pp_within_layers, tp_divides_heads, world_size_within_devices
from autotune.trial.devices import Devices, Gpu, detect_devices
from autotune.trial.geometry import load_geometry
from autotune.trial.planner import GIB, plan_memory, weight_bytes
from serving.config import DeploymentConfig

CPU_24G = Devices(cpus=(0, 1), ram_bytes=24 * GIB)


def config(**flat: object) -> DeploymentConfig:
    return DeploymentConfig().replace(**flat)


def test_parameter_count_matches_transformers() -> None:
    base = config()
    geometry = load_geometry(base.model)
    hf_config = transformers.AutoConfig.from_pretrained(str(base.model.resolve_path()))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert geometry.num_params == sum(p.numel() for p in model.parameters())
    assert weight_bytes(base, geometry) == pytest.approx(geometry.num_params * 4)


def test_quantisation_and_kv_bytes() -> None:
    geometry = load_geometry(config().model)
    fp32 = weight_bytes(config(), geometry)
    int8 = weight_bytes(config(**{"precision.quantization": "int8_dynamic"}), geometry)
    embedding = geometry.vocab_size * geometry.hidden_size
    assert int8 == pytest.approx(
        (embedding + geometry.norm_params) * 4 + (geometry.num_params - embedding - geometry.norm_params)
    )
    assert geometry.kv_bytes_per_token(4) == 2 * 8 * 2 * 64 * 4
    assert fp32 > int8


def test_a_config_that_fits_and_one_that_does_not() -> None:
    geometry = load_geometry(config().model)
    ok = plan_memory(config(), geometry, CPU_24G, PlannerSettings())
    assert ok.fits and ok.reason is None
    tight = PlannerSettings(memory_limit_gb=1.0)
    big = plan_memory(config(**{"cache.kv_cache_memory_gb": 4.0}), geometry, CPU_24G, tight)
    assert not big.fits
    assert big.reason is not None and "cache.kv_cache_memory_gb" in big.reason and "GiB" in big.reason


def test_kv_budget_below_one_sequence_is_pruned() -> None:
    geometry = load_geometry(config().model)
    plan = plan_memory(config(**{"cache.kv_cache_memory_gb": 0.001}), geometry, CPU_24G, PlannerSettings())
    assert not plan.fits and plan.reason is not None and "model.max_model_len" in plan.reason


def test_gpu_memory_is_divided_over_tp_and_pp() -> None:
    geometry = load_geometry(config().model)
    gpus = Devices(cpus=(0,), ram_bytes=GIB, gpus=tuple(Gpu(i, "test", 2 * GIB) for i in range(4)))
    settings = PlannerSettings(process_overhead_gb=0.0)
    one = plan_memory(config(**{"cache.kv_cache_memory_gb": 2.0}), geometry, gpus, settings)
    four = plan_memory(
        config(**{"cache.kv_cache_memory_gb": 2.0, "parallel.tp": 2, "parallel.pp": 2}),
        geometry,
        gpus,
        settings,
    )
    assert not one.fits and four.fits
    assert four.need_bytes == pytest.approx(one.need_bytes / 4)


def test_layout_rules() -> None:
    geometry = load_geometry(config().model)  # 8 heads, 2 KV heads, 8 layers
    assert tp_divides_heads(config(**{"parallel.tp": 2}), geometry, CPU_24G) is None
    reason = tp_divides_heads(config(**{"parallel.tp": 4}), geometry, CPU_24G)
    assert reason is not None and "2 KV heads" in reason
    assert pp_within_layers(config(**{"parallel.pp": 9}), geometry, CPU_24G) is not None
    assert world_size_within_devices(config(**{"parallel.dp": 2}), geometry, CPU_24G) is None
    three = config(**{"parallel.dp": 3})
    assert world_size_within_devices(three, geometry, CPU_24G) is not None
    assert (
        world_size_within_devices(three.replace(**{"parallel.oversubscribe": True}), geometry, CPU_24G)
        is None
    )


def test_device_detection_without_nvml_is_not_an_error() -> None:
    devices = detect_devices()
    assert devices.ram_bytes > 0 and devices.cpus and devices.count >= 1
