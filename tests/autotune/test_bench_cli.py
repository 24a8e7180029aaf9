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


def test_capacity_search_against_any_server_has_the_trial_keys(tmp_path: Path) -> None:
    """`--capacity` runs the trial's load search against a URL: steps, capacity.json and the same keys."""
    with fake_server(20, 10, slots=2) as url:  # carries 2 / (0.02 + 5 * 0.01) = 28.6 req/s with 6 tokens
        out = bench(
            "--url",
            url,
            "--capacity",
            "workload.output_len.mean=6",
            "workload.prefix_len=0",
            "workload.input_len.mean=8",
            "arrival.rate=2",
            "arrival.warmup_requests=0",
            "slo.ttft_ms=300",
            "capacity.step_s=1.5",
            "capacity.max_steps=4",
            "capacity.probe_concurrency=4",
            f"out_dir={tmp_path / 'cap'}",
            cwd=tmp_path,
        )
    assert out.returncode == 0, out.stderr + out.stdout
    assert "capacity:" in out.stdout and "nominal_r2" in out.stdout
    summary = json.loads((tmp_path / "cap" / "summary.json").read_text())
    assert summary["capacity_rps"] >= 2 and summary["capacity_rps_per_device"] == summary["capacity_rps"]
    assert "p99_ttft_ms_ci95_low" in summary and "capacity_output_throughput" in summary
    steps = json.loads((tmp_path / "cap" / "capacity.json").read_text())["steps"]
    assert steps[0]["kind"] == "probe" and steps[1]["rate"] == 2
