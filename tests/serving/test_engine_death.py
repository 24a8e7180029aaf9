"""An engine that can no longer serve: /health turns 503, then the server exits non-zero (single engine
here; dp, tp and pp in test_parallel.py, which kill a replica or rank)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serving.engine.distributed.process import EXIT_RANK_DIED
from serving.launch import free_port, stop_group
from serving.paths import pythonpath_with_package
from tests.serving.conftest import STARTUP_TIMEOUT_S, tiny_deployment

ROOT = Path(__file__).resolve().parents[2]


def test_single_engine_whose_step_loop_dies_exits_70_after_503(tmp_path: Path) -> None:
    port = free_port()
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(tiny_deployment(**{"server.port": port}).to_yaml())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), pythonpath_with_package()])}
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.serving.faulty_server", str(deploy)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=5.0) as client:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            body = {"model": "llama-tiny", "prompt": "Hi", "max_tokens": 4}
            reply = client.post("/v1/completions", json=body)
            assert reply.status_code == 503 and "step loop died" in reply.text, reply.text
            seen = []
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    seen.append(client.get("/health").status_code)
                time.sleep(0.05)
        assert proc.wait(timeout=30) == EXIT_RANK_DIED
        assert 503 in seen and 200 not in seen, seen
    finally:
        stop_group(proc, 10.0)
        log.close()
    assert "engine step loop died" in (tmp_path / "server.log").read_text()
