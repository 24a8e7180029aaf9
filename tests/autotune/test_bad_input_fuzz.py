"""Fuzzed search spaces and Hydra overrides: every bad value is a ConfigError (or exit code 2) whose
message names the key, never a traceback of another kind."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from autotune.cli import main as cli_main
from autotune.space.parse import SEARCH_SPACES_DIR, parse_space, read_space
from serving.config import ConfigError, field_types

JUNK: list[Any] = [
    "abc", "", -1, 0, 10**12, 1.5, -0.5, float("nan"), float("inf"), True, None, [], [1, "x"], {},
    {"type": "int"}, "1e999", "${oops}", "null", "∞", "a.b.c",
]  # fmt: skip
SPEC_FIELDS = ["type", "choices", "low", "high", "log", "step", "when"]
CASES = 400


def _mutate(space: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    """One bad value somewhere in the space; returns it and the key the error must name."""
    data = copy.deepcopy(space)
    where = rng.choice(["base", "dimension", "spec"] if data.get("base") else ["dimension", "spec"])
    if where == "base":
        key = rng.choice(list(data["base"]))
        data["base"][key] = rng.choice(JUNK)
        return data, key
    name = rng.choice(list(data["dimensions"]))
    if where == "dimension":
        data["dimensions"][name] = rng.choice(JUNK)
    else:
        data["dimensions"][name] = {**data["dimensions"][name], rng.choice(SPEC_FIELDS): rng.choice(JUNK)}
    return data, name


@pytest.mark.parametrize("space_file", sorted(SEARCH_SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_fuzzed_search_spaces_fail_naming_the_key(space_file: Path) -> None:
    original = read_space(space_file)  # with its `extends:` parent folded in, as load_space reads it
    rng = random.Random(space_file.stem)
    refused = 0
    for _ in range(CASES // 5):
        data, key = _mutate(original, rng)
        try:
            parse_space(data, space_file)
        except ConfigError as err:
            refused += 1
            assert key in str(err), f"{key!r} not named in: {err}"
        # a junk value that happens to be valid (a bool choice list, a null `when`) parses: fine
    assert refused > CASES // 10


def _override_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def test_fuzzed_deployment_overrides_exit_2_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rng = random.Random(7)
    keys = sorted(field_types())
    for key in rng.sample(keys, 8):
        value = rng.choice(["abc", -7, 1.5, "[1, 2]", "{a: 1}"])
        code = cli_main(["plan", "conf=chat", f"+deployment.{key}={value}", f"study.runs_dir={tmp_path}"])
        err = capsys.readouterr().err
        if code == 0:
            continue  # e.g. a string accepted for model.tokenizer
        assert code == 2, (key, value, err[-2000:])
        assert key.split(".")[-1] in err and "Traceback" not in err, (key, value, err[-2000:])
