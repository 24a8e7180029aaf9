"""Build the byte-level BPE tokenizer shipped with serving/models/* (vocab 32000, Llama-3 style specials).

Why: the shipped models carry no weights, but serving needs a real tokenizer so prompt lengths, detokenised
text and chat templates behave as with a production model. The corpus is the Python standard library's
own source (code, docstrings, comments, the pydoc topic texts), which every machine with Python has, so the
script runs offline. Training is single-threaded and the files are read in sorted order, so the output is
byte-identical on reruns with the same Python version (another stdlib version gives a different, equally
valid tokenizer; the committed tokenizer.json is the reference).

Usage: python scripts/build_tokenizer.py [--out serving/models/llama-57m --out serving/models/llama-tiny]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Deterministic merges need a deterministic word-count pass: one rayon thread. Set before the import.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 32000
"""Total vocabulary including the special tokens (the models' config.json vocab_size)."""
MODEL_MAX_LENGTH = 4096
BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT, PAD]
"""Appended after the BPE vocabulary (ids 31994-31999), as Llama 3 puts its specials after the BPE ids."""

# Llama-3 style: header per message, <|eot_id|> closes each turn. String or OpenAI content-part lists.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] | trim }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

DEFAULT_OUT = [Path("serving/models/llama-57m"), Path("serving/models/llama-tiny")]


def corpus_files() -> list[Path]:
    """Every .py file of the standard library (not site-packages), in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts]
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def iter_texts(files: list[Path]) -> Iterator[str]:
    """File contents as text; undecodable bytes (a few test files use legacy encodings) become U+FFFD."""
    for path in files:
        yield path.read_bytes().decode("utf-8", errors="replace")


def train() -> Tokenizer:
    """Train byte-level BPE up to VOCAB_SIZE - len(SPECIAL_TOKENS), then append the special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    files = corpus_files()
    tokenizer.train_from_iterator(iter_texts(files), trainer=trainer, length=len(files))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id(BOS)
    # Like Llama 3: encode() with special tokens prepends <|begin_of_text|>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != VOCAB_SIZE:
        raise SystemExit(f"vocab size {size} != {VOCAB_SIZE}: the corpus is too small for that many merges")
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, action="append", help="model directory (repeatable)")
    args = parser.parse_args()
    tokenizer = train()
    text = tokenizer.to_str(pretty=True) + "\n"
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    for out in args.out or DEFAULT_OUT:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(text, encoding="utf-8")
        (out / "tokenizer_config.json").write_text(config, encoding="utf-8")
        print(f"wrote {out}/tokenizer.json and tokenizer_config.json")
    print(f"tokenizer.json sha256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
