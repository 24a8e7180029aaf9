"""A tiny Llama trained on the spot (seconds on CPU) on text from a small seeded grammar, saved as a local
Hugging Face directory (config, safetensors, tokenizer), so quality numbers come from a real checkpoint.

Dummy weights give near-uniform predictions: any precision then "agrees" or "disagrees" by chance. This
model's predictions are peaked (the grammar leaves few choices per position), so a damaging quantisation
shows as lost agreement and KL. A test fixture and bench helper, not package code:
`python -m tests.trained_model DIR` writes one.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ("<bos>", "<eos>", "<pad>", "<unk>")
GRAMMAR: dict[str, list[list[str]]] = {
    "S": [
        ["NP", "VP", "."],
        ["NP", "VP", "and", "NP", "VP", "."],
        ["when", "NP", "VP", ",", "NP", "VP", "."],
    ],
    "NP": [["the", "N"], ["a", "ADJ", "N"], ["the", "ADJ", "N"], ["every", "N"]],
    "VP": [["V", "NP"], ["V", "P", "NP"], ["sleeps"], ["V", "NP", "P", "NP"]],
    "N": [["cat"], ["dog"], ["bird"], ["child"], ["teacher"], ["river"], ["house"], ["garden"]],
    "ADJ": [["small"], ["old"], ["green"], ["happy"], ["quiet"]],
    "V": [["sees"], ["likes"], ["follows"], ["finds"], ["helps"]],
    "P": [["near"], ["under"], ["behind"], ["with"]],
}
WORDS = sorted({w for rules in GRAMMAR.values() for rule in rules for w in rule if w not in GRAMMAR})
SEED = 0


def sentence(rng: random.Random, symbol: str = "S") -> list[str]:
    if symbol not in GRAMMAR:
        return [symbol]
    return [w for part in rng.choice(GRAMMAR[symbol]) for w in sentence(rng, part)]


def grammar_text(num_sentences: int, seed: int = SEED) -> str:
    rng = random.Random(seed)
    return " ".join(w for _ in range(num_sentences) for w in sentence(rng))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word level, one id per grammar word; BOS added to text prompts; spaces restored on decode."""
    vocab = {token: i for i, token in enumerate([*SPECIAL, *(f"▁{w}" for w in WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def train(out_dir: Path, *, steps: int = 200, seed: int = SEED) -> Path:
    """Train and save; returns out_dir. Seeded: the same checkpoint every time on the same torch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small is all overhead: more threads only spin on a busy CPU
    try:
        return _train(out_dir, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(out_dir: Path, steps: int, seed: int) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = torch.tensor(tokenizer(grammar_text(4000, seed), add_special_tokens=False)["input_ids"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seq, batch = 48, 32
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([ids[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=chunk, labels=chunk).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps({"steps": steps, "seed": seed, "loss": loss.item()}))
    return out_dir


if __name__ == "__main__":
    started = time.perf_counter()
    path = train(Path(sys.argv[1]))
    print(
        f"{path}: {json.loads((path / 'training.json').read_text())} in {time.perf_counter() - started:.1f} s"
    )
