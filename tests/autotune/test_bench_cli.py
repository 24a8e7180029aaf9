"""`autotune bench` as a user runs it: a real process against a real (scripted) server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fake_server import fake_server


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autotune.cli", "bench", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_cfg_prints_the_composed_config(tmp_path: Path) -> None:
    out = bench(
        "--cfg", "--url", "http://h:1", "workload=summarise", "arrival=gamma", "arrival.rate=4", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "name: summarise" in out.stdout and "kind: gamma" in out.stdout and "rate: 4" in out.stdout
    assert "url: http://h:1" in out.stdout


def test_runs_against_a_server_and_writes_results(tmp_path: Path) -> None:
    with fake_server(5, 2, "ok,http500") as url:
        out = bench(
            "--url",
            url + "/v1",
            "--model",
            "m",
            "arrival.rate=50",
            "arrival.num_requests=6",
            "arrival.warmup_requests=0",
            "progress=false",
            f"out_dir={tmp_path / 'run'}",
            cwd=tmp_path,
        )
    assert out.returncode == 0, out.stderr
    assert "Successful requests" in out.stdout and "http_error" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] == 3 and summary["failed"] == 3
    assert summary["failures_by_reason"] == {"http_error": 3}
    assert summary["config"]["model"] == "m" and summary["config"]["arrival"]["rate"] == 50
    assert len((tmp_path / "run" / "records.jsonl").read_text().splitlines()) == 6


def test_errors_name_the_key(tmp_path: Path) -> None:
    no_url = bench(cwd=tmp_path)
    assert no_url.returncode == 2 and "--url" in no_url.stdout
    typo = bench("--url", "http://h:1", "+arrival.rat=3", cwd=tmp_path)
    assert typo.returncode == 2 and "rat" in typo.stdout
