"""Schemathesis against the builtin server's own /openapi.json: no generated request gets a 5xx, the
engine survives (found: a top_p float32 rounds to 0 killed the step loop), and every KV block is free
after. Runs the schemathesis CLI (a dev dependency), so what is tested is exactly `st run`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from serving.launch import ServerProcess
from tests.serving.conftest import start_healthy, tiny_deployment
from tests.serving.test_server_load import gauge

pytest.importorskip("schemathesis")

SEED = "20261202"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Short contexts: a generated request without max_tokens then runs 63 tokens at most, not 511."""
    config = tiny_deployment(**{"model.max_model_len": 64})
    server = start_healthy(config, tmp_path_factory.mktemp("fuzz-server") / "server.log")
    try:
        yield server
    finally:
        server.stop()


def _fuzz(server: ServerProcess, *args: str) -> int:
    """Run `st run` with the 5xx check; fails the test on any finding; returns the cases generated."""
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json"]
    command += ["--checks", "not_a_server_error", "--seed", SEED, "--request-timeout", "60", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-4000:]
    generated = re.search(r"(\d+) generated", proc.stdout)
    assert generated, proc.stdout[-2000:]
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics").text
    assert gauge(metrics, "serving_kv_cache_blocks_used") == 0
    assert gauge(metrics, "serving_num_requests_running") == 0
    print(f"schemathesis: {generated.group(1)} requests, no 5xx; {server.url}")
    return int(generated.group(1))


def test_fuzzing_the_schema_finds_no_server_error(fuzz_server: ServerProcess) -> None:
    assert _fuzz(fuzz_server, "--phases", "fuzzing", "--max-examples", "15") >= 50


@pytest.mark.slow
def test_long_fuzz_with_schema_coverage_finds_no_server_error(fuzz_server: ServerProcess) -> None:
    assert _fuzz(fuzz_server, "--phases", "examples,coverage,fuzzing", "--max-examples", "100") >= 1000


def test_schema_describes_the_request_bodies(fuzz_server: ServerProcess) -> None:
    schema = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=10).json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"] == "#/components/schemas/CompletionRequest"
    assert "top_p" in schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "429" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "swagger" in httpx.get(f"{fuzz_server.url}/docs", timeout=10).text.lower()
