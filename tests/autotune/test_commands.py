"""`autotune plan`, `export` and `worker` without launching servers."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from autotune.cli import main as cli_main


def test_plan_prints_space_pruned_reasons_and_eta(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = cli_main(
        [
            "plan",
            "conf=chat",
            "planner.memory_limit_gb=1.0",
            "+deployment.parallel.dp_routing=round_robin",
            f"study.runs_dir={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "scheduler.policy" in out and "request, static" in out
    assert "pruned before launch" in out and "memory: needs" in out
    assert "ETA" in out and "10 trials" in out


def test_plan_with_a_space_that_fits(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("dimensions:\n  scheduler.max_num_seqs: {type: categorical, choices: [4, 8]}\n")
    assert cli_main(["plan", "conf=summarise", f"search.space={space}", f"study.runs_dir={tmp_path}"]) == 0
    assert "nothing pruned" in capsys.readouterr().out


def test_plan_lists_what_the_serving_side_refuses(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layouts and precisions the engine cannot start are listed, never launched: the default space
    without its rules and with tp x pp and 16-bit floats on any machine, so the engine's own checks
    (validate_parallel, check_precision_supported) are what refuse them."""
    monkeypatch.setenv("COLUMNS", "400")  # reasons on one line
    space = tmp_path / "space.yaml"
    space.write_text(
        "extends: summarise\nconstraints: []\ndimensions:\n"
        "  parallel.tp: {type: categorical, choices: [1, 2]}\n"
        "  parallel.pp: {type: categorical, choices: [1, 2]}\n"
        "  precision.dtype: {type: categorical, choices: [float32, bfloat16]}\n"
    )
    assert cli_main(["plan", "conf=summarise", f"search.space={space}", f"study.runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "parallel layout: parallel.tp=2 with parallel.pp=2: the builtin engine runs" in out
    assert "precision: precision.quantization='int8_dynamic' needs precision.dtype='float32'" in out
    assert "not on this machine parallel.dp=8 needs 8" in out


def test_export_without_a_study_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["export", "conf=chat", f"study.runs_dir={tmp_path}"]) == 2
    assert "no study 'chat'" in capsys.readouterr().err


def test_worker_needs_a_shared_storage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["worker", "conf=chat"]) == 2
    assert "study.storage" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["run", "conf=chat", "study.n_trail=3"]) == 2
    assert "n_trail" in capsys.readouterr().err
    assert cli_main(["run", "--help"]) == 0
    assert "conf=chat" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "key", "meant"),
    [
        ("+objectives.directions.p99_ttfr_ms=minimize", "objectives.directions.p99_ttfr_ms", "p99_ttft_ms"),
        ("+objectives.constraints.p99_tpto_ms=100", "objectives.constraints.p99_tpto_ms", "p99_tpot_ms"),
        (
            "+objectives.min_constraints.slo_attainmnet=null",
            "min_constraints.slo_attainmnet",
            "slo_attainment",
        ),
        ("export.throughput_metric=output_throughputt", "export.throughput_metric", "output_throughput"),
    ],
)
def test_a_misspelled_metric_fails_the_run_before_any_server_starts(
    override: str,
    key: str,
    meant: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Named, with the metric it most likely meant; no trial directory, no server log, no child process
    (a null, disabled constraint is checked too: a typo is a typo)."""
    monkeypatch.chdir(tmp_path)
    assert (
        cli_main(["run", "conf=chat", "model=llama-tiny", "study.live=off", "tracking=none", override]) == 2
    )
    err = capsys.readouterr().err
    assert key in err and f"did you mean {meant!r}" in err, err
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("server.log"))
    assert not psutil.Process().children(recursive=True)
