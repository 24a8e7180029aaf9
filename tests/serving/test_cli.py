"""`serving` CLI: help, config resolution, one-line errors (exit code 2), `serving launch best.yaml`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving.backends.builtin import BuiltinBackend
from serving.cli import config_schema_markdown, main, parse_override, resolve_config
from serving.config import ConfigError, DeploymentConfig
from serving.launch import free_port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **BuiltinBackend().env(DeploymentConfig(), None)}
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_help_documents_commands_and_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as top:
        main(["--help"])
    assert top.value.code == 0
    assert "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for word in (
        "--config",
        "--set",
        "--port",
        "--host",
        "--print-config",
        "scheduler.max_num_seqs",
        "model.path",
    ):
        assert word in text
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    assert "best.yaml" in capsys.readouterr().out


def test_overrides_are_yaml_scalars() -> None:
    assert parse_override("scheduler.max_num_seqs=8") == ("scheduler.max_num_seqs", 8)
    assert parse_override("scheduler.chunked_prefill=true") == ("scheduler.chunked_prefill", True)
    assert parse_override("model.served_model_name='42'") == ("model.served_model_name", "42")
    assert parse_override("model.tokenizer=") == ("model.tokenizer", None)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("scheduler.max_num_seqs")


def test_yaml_then_set_then_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "llama-tiny"}, "scheduler": {"max_num_seqs": 4}}))
    config = resolve_config(path, ["scheduler.max_num_seqs=6"], port=9001, host="0.0.0.0")
    assert (config.model.path, config.scheduler.max_num_seqs) == ("llama-tiny", 6)
    assert (config.server.port, config.server.host) == (9001, "0.0.0.0")
    assert main(["serve", "--config", str(path), "--set", "cache.block_size=32", "--print-config"]) == 0
    printed = DeploymentConfig.from_dict(yaml.safe_load(capsys.readouterr().out))
    assert printed.cache.block_size == 32 and printed.scheduler.max_num_seqs == 4


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--set", "scheduler.max_num_seqz=3"], "did you mean 'scheduler.max_num_seqs'"),
        (["serve", "--set", "scheduler.max_num_seqs=many"], "scheduler.max_num_seqs='many' is invalid"),
        (["serve", "--config", "/nonexistent.yaml"], "no such file"),
        (["serve", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["serve", "--port", "eighty"], "invalid int value"),
        (["launch"], "required: BEST_YAML"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("serving: error: ")
    assert expected in err


def test_error_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployment:\n  scheduler:\n    policy: fastest\n")
    result = run_cli("launch", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "scheduler.policy='fastest' is invalid" in result.stderr


def test_launch_best_yaml_serves_and_stops_on_sigterm(
    tmp_path: Path, tiny_config: DeploymentConfig, startup_timeout: float
) -> None:
    deployment = tiny_config.replace(**{"server.port": 8999}).to_dict()
    best = tmp_path / "best.yaml"
    best.write_text(
        yaml.safe_dump({"study": "chat", "objectives": {"goodput": 1.0}, "deployment": deployment})
    )
    port = free_port()
    env = {**os.environ, **BuiltinBackend().env(DeploymentConfig(), None)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "launch", str(best), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the server answers
        assert line.strip() == f"serving llama-tiny at http://127.0.0.1:{port}", line
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True},
            timeout=60,
        )
        assert reply.json()["usage"]["completion_tokens"] == 4
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + startup_timeout
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0


def test_docs_schema_is_current_and_their_yaml_example_loads() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    schema = config_schema_markdown()
    assert all(f"`{key}`" in schema for key in DeploymentConfig().to_flat())
    documented = docs.split("<!-- schema:begin -->\n")[1].split("<!-- schema:end -->")[0]
    assert documented == schema + "\n", "docs/serving.md is stale: paste the output of `serving schema`"
    examples = [block.split("```")[0] for block in docs.split("```yaml\n")[1:]]
    assert examples
    for example in examples:
        DeploymentConfig.from_dict(yaml.safe_load(example))
