"""The shipped model directories: tokenizer behaviour, chat template, configs, and the build script."""

from __future__ import annotations

import json
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from serving.config import SHIPPED_MODELS_DIR

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("llama-57m", "llama-tiny")
SPECIALS = {
    "<|begin_of_text|>": 31994,
    "<|end_of_text|>": 31995,
    "<|start_header_id|>": 31996,
    "<|end_header_id|>": 31997,
    "<|eot_id|>": 31998,
    "<|pad|>": 31999,
}
BUILT_WITH_PYTHON = "3.11.7"
"""The stdlib version the shipped tokenizer.json was trained on (its corpus)."""

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "Grüße aus Köln — naïve café, ñ, ß, Å",
    "日本語のテキスト、中文字符，한국어 텍스트",
    "emoji 🤖🚀👩‍👩‍👧‍👦 flags 🇩🇪 and math ∑∫√∞ ≠ ≤",
    "mixed RTL שלום עולם مرحبا بالعالم",
    "control \x00\x01\x7f and lone combining \u0301 and U+FFFD \ufffd",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment <|not_special|>",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(SHIPPED_MODELS_DIR / "llama-57m", local_files_only=True)
    assert isinstance(tok, PreTrainedTokenizerFast)
    return tok


@pytest.mark.parametrize("model", MODELS)
def test_model_dirs_are_complete_and_share_the_tokenizer(model: str) -> None:
    directory = SHIPPED_MODELS_DIR / model
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert not any(n.endswith((".safetensors", ".bin")) for n in names), "shipped models carry no weights"
    shipped = (SHIPPED_MODELS_DIR / "llama-57m" / "tokenizer.json").read_bytes()
    assert (directory / "tokenizer.json").read_bytes() == shipped


def test_vocab_size_and_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(tokenizer) == 32000
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS} == SPECIALS
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.unk_token is None
    assert tokenizer.model_max_length == 4096


@pytest.mark.parametrize("text", TEXTS)
def test_any_text_round_trips_exactly(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer.encode(text)
    assert with_bos == [SPECIALS["<|begin_of_text|>"], *ids]
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_random_unicode_round_trips(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(0)
    for _ in range(50):
        # Any code point outside the surrogate range, from ASCII to the astral planes.
        chars = [
            chr(
                rng.choice(
                    [rng.randrange(32, 127), rng.randrange(0xA0, 0xD800), rng.randrange(0xE000, 0x10FFFF)]
                )
            )
            for _ in range(40)
        ]
        text = "".join(chars)
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_random_ids_decode_and_reencode_stably(tokenizer: PreTrainedTokenizerFast) -> None:
    """vLLM's random dataset decodes random ids to a prompt and re-encodes it: that text must be stable."""
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(0, 32000) for _ in range(rng.randrange(1, 200))]
        text = tokenizer.decode(ids)
        again = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(again) == text
        assert all(0 <= i < 32000 for i in again)


def test_chat_template_renders_llama3_headers(tokenizer: PreTrainedTokenizerFast) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": [{"type": "text", "text": "Hi ü 日本"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi ü 日本<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenizer.encode(str(text), add_special_tokens=False)
    assert ids[0] == SPECIALS["<|begin_of_text|>"]
    assert ids.count(SPECIALS["<|eot_id|>"]) == 2
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert str(without_prompt).endswith("<|eot_id|>")


@pytest.mark.parametrize(
    ("model", "expected_params"),
    [("llama-57m", 56_893_952), ("llama-tiny", 4_170_048)],
)
def test_configs(model: str, expected_params: int) -> None:
    directory = SHIPPED_MODELS_DIR / model
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    assert config.model_type == "llama"
    assert config.vocab_size == 32000
    assert config.tie_word_embeddings is False
    assert config.max_position_embeddings == 4096
    assert config.eos_token_id == [SPECIALS["<|end_of_text|>"], SPECIALS["<|eot_id|>"]]
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config.eos_token_id
    with torch.device("meta"):
        model_obj = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model_obj.parameters()) == expected_params


def test_llama_57m_shape() -> None:
    config = AutoConfig.from_pretrained(SHIPPED_MODELS_DIR / "llama-57m", local_files_only=True)
    shape = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
    )
    assert shape == (512, 1536, 8, 8, 2)


@pytest.mark.slow  # ~10 s idle, ~25 s on a busy machine (BPE training over the stdlib)
def test_build_script_reproduces_the_shipped_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "tok"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_tokenizer.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    built = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(built) == 32000
    assert {t: built.convert_tokens_to_ids(t) for t in SPECIALS} == SPECIALS
    shipped = SHIPPED_MODELS_DIR / "llama-57m"
    assert (out / "tokenizer_config.json").read_text() == (shipped / "tokenizer_config.json").read_text()
    if platform.python_version() != BUILT_WITH_PYTHON:
        pytest.skip(f"byte equality needs the Python {BUILT_WITH_PYTHON} stdlib corpus")
    assert (out / "tokenizer.json").read_bytes() == (shipped / "tokenizer.json").read_bytes()
