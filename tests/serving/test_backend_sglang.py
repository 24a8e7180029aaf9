"""The SGLang backend: its command against SGLang's documented flags (ServerArgs in
python/sglang/srt/server_args.py, sgl-project/sglang at 001067f) and, where SGLang is installed
(SERVING_SGLANG_PYTHON or .venv-sglang), parsed by SGLang's own argument parser."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from serving.backends import get_backend
from serving.backends.engine_support import kv_bytes_per_token
from serving.backends.sglang import SGLangBackend
from serving.config import ConfigError, DeploymentConfig

DOCUMENTED: dict[str, tuple[str, ...] | None] = {
    "--model-path": None,
    "--tokenizer-path": None,
    "--served-model-name": None,
    "--load-format": ("auto", "pt", "safetensors", "npcache", "dummy", "sharded_state", "gguf"),
    "--random-seed": None,
    "--context-length": None,
    "--tp-size": None,
    "--pp-size": None,
    "--dp-size": None,
    "--load-balance-method": (
        "auto",
        "round_robin",
        "follow_bootstrap_room",
        "total_requests",
        "total_tokens",
    ),
    "--dtype": ("auto", "half", "float16", "bfloat16", "float", "float32"),
    "--max-running-requests": None,
    "--max-prefill-tokens": None,
    "--chunked-prefill-size": None,
    "--schedule-policy": ("lpm", "random", "fcfs", "dfs-weight", "lof", "priority", "routing-key"),
    "--enable-priority-scheduling": (),
    "--schedule-low-priority-values-first": (),
    "--page-size": None,
    "--max-total-tokens": None,
    "--disable-radix-cache": (),
    "--attention-backend": ("triton", "torch_native", "flex_attention", "flashinfer", "fa3", "intel_amx"),
    "--device": ("cuda", "xpu", "hpu", "npu", "cpu", "musa"),
    "--host": None,
    "--port": None,
    "--log-level": None,
    "--enable-metrics": (),
}
"""Flag -> accepted values (None: any value; (): a switch without a value), from ServerArgs' field
annotations; the value lists are the subsets of SGLang's choices that matter here."""

BASE: dict[str, Any] = {
    "backend": "sglang",
    "model.path": "llama-57m",
    "model.max_model_len": 512,
    "scheduler.max_num_batched_tokens": 512,
    "cache.kv_cache_memory_gb": 0.25,
}


def sglang_config(**overrides: Any) -> DeploymentConfig:
    return DeploymentConfig().replace(**{**BASE, **overrides})


def parse(argv: list[str]) -> dict[str, str | None]:
    """argv after the entry point -> {flag: value or None for switches}, rejecting undocumented flags."""
    parsed: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        name = argv[i]
        assert name in DOCUMENTED, f"{name} is not a documented SGLang flag"
        assert name not in parsed, f"{name} given twice"
        choices = DOCUMENTED[name]
        if choices == ():
            parsed[name] = None
            i += 1
            continue
        value = argv[i + 1]
        assert not value.startswith("--"), f"{name} lacks a value"
        if choices is not None:
            assert value in choices, f"{name} {value}: SGLang accepts {choices}"
        parsed[name] = value
        i += 2
    return parsed


CONFIGS = [
    {},
    {"parallel.tp": 2, "parallel.pp": 2, "parallel.dp": 2, "parallel.dp_routing": "round_robin"},
    {"scheduler.chunked_prefill": True, "scheduler.queue_order": "priority", "attention": "sdpa"},
    {"device": "cpu", "precision.dtype": "bfloat16", "cache.block_size": 64, "model.tokenizer": "llama-57m"},
    {"cache.enable_prefix_caching": False},
]


def test_get_backend_returns_sglang() -> None:
    assert isinstance(get_backend("sglang"), SGLangBackend)


@pytest.mark.parametrize("overrides", CONFIGS)
def test_every_flag_is_documented_with_an_accepted_value(overrides: dict[str, Any]) -> None:
    config = sglang_config(**overrides)
    SGLangBackend().validate(config)
    argv = SGLangBackend(extra=[]).command(config, 30001)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    parse(argv[3:])


def test_knobs_map_to_their_sglang_flags() -> None:
    config = sglang_config(
        **{
            "parallel.tp": 2,
            "parallel.dp": 3,
            "scheduler.max_num_seqs": 40,
            "scheduler.max_num_batched_tokens": 1024,
            "scheduler.chunked_prefill": True,
            "scheduler.queue_order": "priority",
            "cache.block_size": 32,
            "model.seed": 5,
        }
    )
    flags = parse(SGLangBackend(extra=[]).command(config, 30001)[3:])
    assert flags["--tp-size"] == "2" and flags["--dp-size"] == "3" and flags["--pp-size"] == "1"
    assert flags["--load-balance-method"] == "total_requests"
    assert flags["--max-running-requests"] == "40"
    assert flags["--max-prefill-tokens"] == "1024" and flags["--chunked-prefill-size"] == "1024"
    assert flags["--page-size"] == "32" and flags["--random-seed"] == "5"
    assert flags["--load-format"] == "dummy" and flags["--context-length"] == "512"
    assert flags["--port"] == "30001"
    assert "--enable-priority-scheduling" in flags and "--schedule-low-priority-values-first" in flags
    # 0.25 GiB over (2 x 8 layers x 2 kv heads x 64 dims x 4 bytes) per token = 32768 tokens
    assert kv_bytes_per_token(config) == 8192
    assert flags["--max-total-tokens"] == str(int(0.25 * 2**30) // 8192)


def test_chunked_prefill_off_is_minus_one() -> None:
    flags = parse(SGLangBackend(extra=[]).command(sglang_config(), 30001)[3:])
    assert flags["--chunked-prefill-size"] == "-1"
    assert "--attention-backend" not in flags and "--device" not in flags
    assert "--disable-radix-cache" not in flags  # prefix caching on: SGLang's own default


def test_prefix_caching_off_disables_the_radix_cache() -> None:
    config = sglang_config(**{"cache.enable_prefix_caching": False})
    assert "--disable-radix-cache" in parse(SGLangBackend(extra=[]).command(config, 30001)[3:])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"scheduler.policy": "request"}, "scheduler.policy"),
        ({"scheduler.policy": "static"}, "scheduler.policy"),
        ({"scheduler.queue_order": "sjf"}, "scheduler.queue_order"),
        ({"attention": "eager"}, "attention"),
        ({"precision.quantization": "int8_weight_only"}, "precision.quantization"),
        ({"cache.kv_cache_memory_gb": 0.001}, "cache.kv_cache_memory_gb"),
        ({"server.log_level": "trace"}, "server.log_level"),
    ],
)
def test_validate_refuses_knobs_sglang_lacks(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match="sglang") as err:
        SGLangBackend().validate(sglang_config(**overrides))
    assert field in str(err.value)


def test_extra_args_may_not_override_a_mapped_knob() -> None:
    with pytest.raises(ConfigError, match="--tp-size"):
        SGLangBackend(extra=["--tp-size", "4"]).command(sglang_config(), 30001)


def test_cpu_env_enables_the_cpu_engine_and_binds_ranks(fake_python: Path) -> None:
    env = SGLangBackend(python=fake_python).env(sglang_config(**{"device": "cpu", "parallel.tp": 2}), [0, 1])
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1"


def sglang_installed() -> bool:
    python = SGLangBackend().python
    if not python.exists():
        return False
    return subprocess.run([str(python), "-c", "import sglang"], capture_output=True).returncode == 0


@pytest.mark.skipif(
    not sglang_installed(), reason="SGLang is not installed (SERVING_SGLANG_PYTHON/.venv-sglang)"
)
def test_sglang_own_parser_accepts_the_command() -> None:
    backend = SGLangBackend(extra=[])
    argvs = [backend.command(sglang_config(**o), 30001)[3:] for o in CONFIGS]
    script = (
        "import json, sys\n"
        "from sglang.srt.server_args import prepare_server_args\n"
        "for argv in json.load(sys.stdin):\n"
        "    prepare_server_args(argv)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [str(backend.python), "-c", script],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
