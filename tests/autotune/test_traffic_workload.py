"""Prompts: seeded and reproducible, exact token counts with the shipped tokenizer, lengths as configured."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.traffic.config import LengthDistribution, WorkloadConfig
from autotune.traffic.workload import PromptBuilder, make_builder, sample_lengths

CHAT = WorkloadConfig(
    prefix_len=24,
    input_len=LengthDistribution(dist="uniform", mean=64, range_ratio=0.5),
    output_len=LengthDistribution(dist="uniform", mean=16, range_ratio=0.5),
    seed=3,
)


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return make_builder(CHAT, "llama-tiny")


def test_completions_prompts_have_exact_token_counts(builder: PromptBuilder) -> None:
    tok = builder.tokenizer
    assert tok is not None
    requests = builder.build(40)
    for req in requests:
        ids = tok(req.prompt)["input_ids"]  # as the server tokenises /v1/completions text (with BOS)
        assert len(ids) == req.prompt_len == req.target_len
        assert 24 + 32 <= req.prompt_len <= 24 + 96
        assert req.prompt.startswith(builder.prefix_text)  # the shared system prefix
    assert len({req.prompt_len for req in requests}) > 5  # lengths really vary


def test_same_seed_same_prompts_other_seed_others(builder: PromptBuilder) -> None:
    again = make_builder(CHAT, "llama-tiny").build(10)
    assert builder.build(10) == again
    assert builder.build_one(7) == again[7]  # request i depends only on (seed, i)
    other = make_builder(WorkloadConfig(**{**CHAT.__dict__, "seed": 4}), "llama-tiny").build(10)
    assert [r.prompt for r in other] != [r.prompt for r in again]
    warm = builder.build(3, warmup=True)
    assert {r.prompt for r in warm}.isdisjoint({r.prompt for r in again})


def test_chat_prompts_count_the_template(builder: PromptBuilder) -> None:
    chat = make_builder(WorkloadConfig(**{**CHAT.__dict__, "api": "chat"}), "llama-tiny")
    tok = chat.tokenizer
    assert tok is not None
    for req in chat.build(10):
        assert req.system == chat.prefix_text and req.target_len is None
        ids = tok.apply_chat_template(req.messages(), add_generation_prompt=True, tokenize=True)["input_ids"]
        assert len(ids) == req.prompt_len
        assert len(tok(req.prompt, add_special_tokens=False)["input_ids"]) >= 32


def test_without_a_tokenizer_prompts_are_words() -> None:
    words = make_builder(CHAT, "no-such-model")
    assert words.tokenizer is None
    req = words.build_one(0)
    assert req.prompt_len is None and req.target_len == 24 + len(req.units)
    assert len(req.prompt.split()) == 24 + len(req.units)


def test_unknown_tokenizer_is_named() -> None:
    with pytest.raises(ValueError, match=r"workload\.tokenizer='nope'"):
        make_builder(WorkloadConfig(tokenizer="nope"), None)


@pytest.mark.parametrize(
    ("dist", "low", "high"),
    [
        (LengthDistribution(dist="constant", mean=50), 50, 50),
        (LengthDistribution(dist="uniform", mean=100, range_ratio=0.2), 80, 120),
        (LengthDistribution(dist="normal", mean=100, std=30, min=60, max=140), 60, 140),
        (LengthDistribution(dist="lognormal", mean=100, std=0.5, min=10, max=1000), 10, 1000),
    ],
)
def test_length_distributions(dist: LengthDistribution, low: int, high: int) -> None:
    values = sample_lengths(dist, 5000, np.random.default_rng(0))
    assert values.min() >= low and values.max() <= high
    assert abs(values.mean() - dist.mean) < 0.05 * dist.mean
