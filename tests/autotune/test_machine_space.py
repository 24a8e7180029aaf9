"""The default spaces sweep every knob on the devices that exist: `machine: true` dimensions keep what the
machine runs (cores or GPUs, the CPU's ISA), derived from hand-built machines here; `extends:` writes a
space as changes to another."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autotune.space.machine import narrow_to_machine
from autotune.space.parse import load_space, read_space
from autotune.trial.devices import Devices, Gpu, detect_cpu_flags
from autotune.trial.planner import GIB
from serving.config import ConfigError

AVX2_2_CORES = Devices(cpus=(0, 1), ram_bytes=16 * GIB, cpu_flags=frozenset({"avx2", "fma"}))
EPYC_2_CORES = Devices(
    cpus=(0, 1), ram_bytes=16 * GIB, cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
)
ONE_CORE = Devices(cpus=(0,), ram_bytes=4 * GIB)
EIGHT_GPUS = Devices(
    cpus=tuple(range(32)), ram_bytes=512 * GIB, gpus=tuple(Gpu(i, "H100", 80 * GIB) for i in range(8))
)

MISSION = {
    "parallel.dp",
    "parallel.tp",
    "parallel.pp",
    "precision.dtype",
    "precision.quantization",
    "attention",
    "scheduler.policy",
    "scheduler.max_num_seqs",
    "scheduler.max_num_batched_tokens",
    "scheduler.chunked_prefill",
    "scheduler.queue_order",
    "cache.kv_cache_memory_gb",
    "cache.block_size",
}
"""Every knob the tuner is for: layout, precision, attention, batch limits, scheduling, KV cache."""


def choices(space_name: str, devices: Devices) -> dict[str, tuple[object, ...]]:
    space = narrow_to_machine(load_space(space_name), devices)
    return {d.name: d.choices for d in space.dimensions if d.kind == "categorical"}


@pytest.mark.parametrize("name", ["chat", "summarise"])
def test_the_default_spaces_search_every_knob(name: str) -> None:
    assert {d.name for d in load_space(name).dimensions} >= MISSION


@pytest.mark.parametrize("name", ["chat", "summarise"])
def test_two_cores_without_bf16_search_float32_and_degrees_up_to_two(name: str) -> None:
    found = choices(name, AVX2_2_CORES)
    assert found["parallel.dp"] == found["parallel.tp"] == found["parallel.pp"] == (1, 2)
    assert found["precision.dtype"] == ("float32",)
    assert found["precision.quantization"] == ("none", "int8_dynamic", "int8_weight_only")
    space = narrow_to_machine(load_space(name), AVX2_2_CORES)
    assert all(seed.get("precision.dtype") != "bfloat16" for seed in space.seeds)
    assert any(
        "bfloat16 has no native kernel on this CPU (no avx512_bf16 / amx_bf16)" in n for n in space.narrowed
    )
    assert any(n.startswith("seeds[") and "bfloat16" in n for n in space.narrowed)


def test_a_cpu_with_avx512_bf16_searches_bfloat16_too() -> None:
    found = choices("chat", EPYC_2_CORES)
    assert found["precision.dtype"] == ("float32", "bfloat16")
    space = narrow_to_machine(load_space("chat"), EPYC_2_CORES)
    assert any(seed.get("precision.dtype") == "bfloat16" for seed in space.seeds)


def test_one_core_searches_no_parallel_layout() -> None:
    found = choices("chat", ONE_CORE)
    assert found["parallel.dp"] == found["parallel.tp"] == found["parallel.pp"] == (1,)
    assert all(
        seed.get("parallel.dp", 1) == 1 for seed in narrow_to_machine(load_space("chat"), ONE_CORE).seeds
    )


def test_a_gpu_node_searches_its_layouts_dtypes_and_gpu_quantisation() -> None:
    found = choices("chat", EIGHT_GPUS)
    assert found["parallel.tp"] == (1, 2, 4, 8) and found["parallel.pp"] == (1, 2, 4)
    assert found["precision.dtype"] == ("float32", "bfloat16", "float16")
    assert found["precision.quantization"] == (
        "none",
        "int8_weight_only",
        "int4_weight_only",
        "bnb_int8",
        "bnb_nf4",
    )


def test_only_machine_keys_can_be_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {"dimensions": {"attention": {"type": "categorical", "choices": ["paged"], "machine": True}}}
        )
    )
    with pytest.raises(ConfigError, match=r"dimensions\.attention\.machine: only categorical dimensions of"):
        load_space(path)


def test_a_dimension_with_no_choice_that_runs_here_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    spec = {"type": "categorical", "choices": ["float16"], "machine": True}
    path.write_text(yaml.safe_dump({"dimensions": {"precision.dtype": spec}}))
    with pytest.raises(ConfigError, match=r"dimensions\.precision\.dtype: no choice runs here"):
        narrow_to_machine(load_space(path), AVX2_2_CORES)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert detect_cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert detect_cpu_flags(tmp_path / "missing") == frozenset()


def test_extends_changes_entries_by_key_and_keeps_their_order(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text(
        "extends: chat\nbase: {server.log_level: info}\n"
        "dimensions:\n  cache.block_size: {type: categorical, choices: [16, 32, 64]}\n"
        "  parallel.dp_routing: {type: categorical, choices: [round_robin, least_outstanding]}\n"
    )
    parent, space = load_space("chat"), load_space(child)
    names = [d.name for d in space.dimensions]
    assert names == [d.name for d in parent.dimensions] + ["parallel.dp_routing"]
    assert space.dimension("cache.block_size").choices == (16, 32, 64)
    assert space.base["server.log_level"] == "info" and space.seeds == parent.seeds


def test_extends_in_a_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends this file again"):
        read_space(tmp_path / "a.yaml")
