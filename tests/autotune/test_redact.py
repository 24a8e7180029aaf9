"""Passwords in study and tracking URLs and API keys never reach what is shown or stored."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from autotune.cli import main as cli_main
from autotune.commands.session import Session, context_table, start
from autotune.config.redact import redact_text, redact_url

PASSWORD = "hunter2-9b1f"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://bob:{PASSWORD}@db:5432/optuna", "postgresql://bob:***@db:5432/optuna"),
        (
            f"postgresql+psycopg://bob:{PASSWORD}@db/o?sslmode=require",
            "postgresql+psycopg://bob:***@db/o?sslmode=require",
        ),
        ("postgresql://bob:p@ss@db/o", "postgresql://bob:***@db/o"),  # an unescaped @ in the password
        (f"http://u:{PASSWORD}@mlflow:5000", "http://u:***@mlflow:5000"),
        ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
        ("postgresql://bob@db/o", "postgresql://bob@db/o"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_masks_api_keys_but_not_nulls() -> None:
    text = "server:\n  api_key: sk-live-1\n  port: 1\nother:\n  api_key: null\n"
    shown = redact_text(text)
    assert "sk-live-1" not in shown and "api_key: '<redacted>'" in shown and "api_key: null" in shown


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_storage_password_is_nowhere_shown(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    storage = f"study.storage=postgresql://bob:{PASSWORD}@127.0.0.1:{_closed_port()}/optuna"
    args = ["conf=chat", storage, "tracking=none", f"study.runs_dir={tmp_path}"]
    assert cli_main(["run", *args, "--cfg"]) == 0
    printed = capsys.readouterr().out
    assert "bob:***@127.0.0.1" in printed and PASSWORD not in printed
    session = start(args, "usage")
    assert isinstance(session, Session)
    assert session.ctx.storage_url.count(PASSWORD) == 1  # the live connection keeps it
    assert PASSWORD not in session.resolved_yaml  # runs/<study>/config.yaml and the MLflow artifact
    assert PASSWORD not in str(context_table(session.ctx))  # the report's context table
    assert cli_main(["run", *args]) == 2  # nothing listens there: a clear message, no traceback
    out, err = capsys.readouterr()
    assert "cannot open the study storage" in err and "bob:***@" in err
    assert PASSWORD not in out + err and "Traceback" not in err
