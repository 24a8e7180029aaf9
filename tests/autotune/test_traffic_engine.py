"""Against the builtin engine (`serving serve`, llama-tiny): the server's usage equals the requested lengths
for both APIs, and its /tokenize agrees with the prompts we built."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from autotune.traffic.config import ArrivalConfig, LengthDistribution, WorkloadConfig
from autotune.traffic.runner import run_benchmark
from serving.config import DeploymentConfig
from serving.launch import ServerProcess

TINY = {
    "model.path": "llama-tiny",
    "model.max_model_len": 512,
    "scheduler.max_num_seqs": 32,
    "scheduler.max_num_batched_tokens": 2048,
    "cache.kv_cache_memory_gb": 0.05,
    "server.port": 0,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("builtin") / "server.log"
    with ServerProcess(DeploymentConfig().replace(**TINY), log_path=log) as proc:
        proc.wait_healthy(180)
        yield proc


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_usage_equals_requested_lengths(
    server: ServerProcess, api: Literal["completions", "chat"], tmp_path: Path
) -> None:
    workload = WorkloadConfig(
        api=api,
        prefix_len=16,
        input_len=LengthDistribution(dist="uniform", mean=48, range_ratio=0.5),
        output_len=LengthDistribution(dist="uniform", mean=10, range_ratio=0.5),
    )
    arrival = ArrivalConfig(kind="poisson", rate=20, num_requests=10, warmup_requests=1)
    result = run_benchmark(server.url, None, workload, arrival, out_dir=tmp_path, progress=False)
    assert result.summary["completed"] == 10, result.failures_by_reason
    assert result.alignment is not None and result.alignment.server_tokenize
    assert result.alignment.mismatched == 0  # the shipped tokenizer is the server's
    for record in result.records:
        assert record.usage_reported
        assert record.output_tokens == record.expected_output_len
        assert record.prompt_len == record.expected_prompt_len
        assert record.chunks == record.output_tokens  # the builtin server streams one token per chunk
    if api == "completions":
        assert all(r.prompt_len is not None and 16 + 24 <= r.prompt_len <= 16 + 72 for r in result.records)
    assert (tmp_path / "summary.json").is_file()
