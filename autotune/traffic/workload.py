"""Seeded synthetic prompts with exact token counts: a shared system-prompt prefix plus a per-request part.

Prompts are built as token ids with the server's tokenizer (so the count is known), decoded to text, and
re-encoded until the text tokenizes to exactly the target (decode -> encode is not the identity for random
ids). Request i depends only on (seed, i): the same seed gives the same prompts whatever the count."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autotune.traffic.config import LengthDistribution, WorkloadConfig

_PREFIX_STREAM = 1
_TIMED_STREAM = 2
_WARMUP_STREAM = 3
_FIX_ITERATIONS = 12
# Without a local tokenizer prompts are plain words; their count is then learnt from the server's /tokenize.
_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there one all we their been has when who will more no if out so said what "
    "up its about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too little state good very "
    "make world still own"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class PreparedRequest:
    """One request ready to send; prompt_len is the count the server should report (None: unknown)."""

    index: int
    prompt: str
    """Completions: the whole prompt text. Chat: the user message."""
    system: str | None
    """Chat: the shared system message; None in completions mode."""
    prompt_len: int | None
    output_len: int
    target_len: int | None = None
    """The count asked for (completions: prefix_len + input_len); None when the chat template decides."""
    units: tuple[int, ...] = ()
    """The per-request token ids (or word indices) behind `prompt`, kept for re-alignment."""

    def messages(self) -> list[dict[str, str]]:
        out = [] if self.system is None else [{"role": "system", "content": self.system}]
        return [*out, {"role": "user", "content": self.prompt}]


def sample_lengths(dist: LengthDistribution, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` integer lengths from `dist`, clipped to [min, max]."""
    if dist.dist == "constant":
        values = np.full(count, float(dist.mean))
    elif dist.dist == "uniform":
        low = int(np.floor(dist.mean * (1 - dist.range_ratio)))
        high = int(np.ceil(dist.mean * (1 + dist.range_ratio)))
        values = rng.integers(low, high + 1, size=count).astype(float)
    elif dist.dist == "normal":
        values = np.rint(rng.normal(dist.mean, dist.std, size=count))
    else:  # lognormal with the requested mean: mu = ln(mean) - sigma^2 / 2
        mu = np.log(dist.mean) - dist.std**2 / 2
        values = np.rint(rng.lognormal(mu, dist.std, size=count))
    upper = np.inf if dist.max is None else dist.max
    return np.clip(values, max(dist.min, 1), upper).astype(int)


def resolve_tokenizer_path(name: str | None) -> Path | None:
    """A local tokenizer dir for `name`: a path, or a model shipped under serving/models/."""
    if not name:
        return None
    candidates = [Path(name).expanduser()]
    try:
        import serving

        candidates.append(Path(serving.__file__).parent / "models" / name)
    except ImportError:
        pass
    for path in candidates:
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return path
    return None


_TOKENIZER_LOAD = threading.Lock()


def load_tokenizer(path: str) -> Any:
    """transformers' AutoTokenizer from a local dir, cached per thread.

    Parallel trials prepare their prompts in threads: transformers' lazy module import is not
    thread-safe (a second thread can see a half-imported module), and a fast tokenizer must not encode
    from two threads at once, so loading is serialised and each thread keeps its own instance.
    """
    with _TOKENIZER_LOAD:
        return _load_tokenizer(path, threading.get_ident())


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, thread: int) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class PromptBuilder:
    """Builds PreparedRequests for a workload, with a tokenizer (exact counts) or without one (words)."""

    def __init__(self, workload: WorkloadConfig, tokenizer: Any | None) -> None:
        self.workload = workload
        self.tokenizer = tokenizer
        self._allowed = self._allowed_ids() if tokenizer is not None else np.arange(len(_WORDS))
        self._special = int(tokenizer.num_special_tokens_to_add()) if tokenizer is not None else 0
        prefix_rng = np.random.default_rng([workload.seed, _PREFIX_STREAM])
        prefix_units = max(workload.prefix_len - self._special, 0)
        self.prefix_units = self._draw(prefix_rng, prefix_units)
        self.prefix_text = self.render(self.prefix_units) if prefix_units else ""

    def _allowed_ids(self) -> np.ndarray:
        """Token ids whose text is printable and not whitespace-only: they survive decode -> encode best."""
        tok: Any = self.tokenizer
        special = set(tok.all_special_ids)
        ids = [i for i in range(len(tok)) if i not in special]
        texts = tok.batch_decode([[i] for i in ids])
        keep = [i for i, t in zip(ids, texts, strict=True) if t.strip() and "\ufffd" not in t]
        return np.array(keep, dtype=np.int64)

    def _draw(self, rng: np.random.Generator, count: int) -> list[int]:
        return [int(v) for v in rng.choice(self._allowed, size=count)] if count > 0 else []

    def render(self, units: list[int] | tuple[int, ...]) -> str:
        """Text for token ids (or word indices without a tokenizer)."""
        if self.tokenizer is None:
            return " ".join(_WORDS[u] for u in units)
        text: str = self.tokenizer.decode(list(units), skip_special_tokens=True)
        return text

    def full_text(self, user_text: str) -> str:
        """Completions prompt: the shared prefix then the per-request part."""
        return f"{self.prefix_text}\n{user_text}" if self.prefix_text else user_text

    def count_local(self, user_text: str) -> int | None:
        """Prompt tokens as the server will count them, by the local tokenizer (None without one)."""
        tok = self.tokenizer
        if tok is None:
            return None
        if self.workload.api == "chat" and getattr(tok, "chat_template", None):
            system = self.prefix_text or None
            req = PreparedRequest(0, user_text, system, None, 1)
            ids = tok.apply_chat_template(req.messages(), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return len(ids)
        return len(tok(self.full_text(user_text), add_special_tokens=True)["input_ids"])

    def fit(
        self, units: list[int], target: int, count: Any, rng: np.random.Generator
    ) -> tuple[list[int], int]:
        """Drop or append units until `count(text)` equals `target` (or the iterations run out)."""
        units = list(units)
        measured = count(self.render(units))
        for _ in range(_FIX_ITERATIONS):
            if measured is None or measured == target:
                break
            units = self.adjust(units, measured - target, rng)
            measured = count(self.render(units))
        return units, measured

    def adjust(self, units: list[int], excess: int, rng: np.random.Generator) -> list[int]:
        """Drop `excess` units from the end (or append -excess new ones)."""
        if excess > 0:
            return units[: max(len(units) - excess, 1)]
        return units + self._draw(rng, -excess)

    def build_one(self, index: int, stream: int = _TIMED_STREAM) -> PreparedRequest:
        rng = np.random.default_rng([self.workload.seed, stream, index])
        input_len = int(sample_lengths(self.workload.input_len, 1, rng)[0])
        output_len = int(sample_lengths(self.workload.output_len, 1, rng)[0])
        units = self._draw(rng, input_len)
        prompt_len: int | None = None
        target = self.workload.prefix_len + input_len if self.workload.api == "completions" else None
        if self.tokenizer is not None:
            if self.workload.api == "completions":
                units, prompt_len = self.fit(
                    units, self.workload.prefix_len + input_len, self.count_local, rng
                )
            else:
                prompt_len = self.count_local(self.render(units))
        user_text = self.render(units)
        chat = self.workload.api == "chat"
        return PreparedRequest(
            index=index,
            prompt=user_text if chat else self.full_text(user_text),
            system=(self.prefix_text or None) if chat else None,
            prompt_len=prompt_len,
            output_len=output_len,
            target_len=target,
            units=tuple(units),
        )

    def build(self, count: int, *, warmup: bool = False) -> list[PreparedRequest]:
        stream = _WARMUP_STREAM if warmup else _TIMED_STREAM
        return [self.build_one(i, stream) for i in range(count)]


def tokenizer_path(workload: WorkloadConfig, model: str | None) -> Path | None:
    """The workload's tokenizer dir, else the model's (when it names a local dir), else None (words)."""
    path = resolve_tokenizer_path(workload.tokenizer) or resolve_tokenizer_path(model)
    if workload.tokenizer and path is None:
        raise ValueError(
            f"workload.tokenizer={workload.tokenizer!r} is neither a tokenizer dir nor a model shipped under "
            "serving/models/; give a local path or null (use the server's /tokenize)"
        )
    return path


def make_builder(workload: WorkloadConfig, model: str | None) -> PromptBuilder:
    """A builder with the workload's tokenizer, else the model's (when it names a local dir), else words."""
    path = tokenizer_path(workload, model)
    return PromptBuilder(workload, load_tokenizer(str(path)) if path is not None else None)


def preload_tokenizer(workload: WorkloadConfig, model: str | None) -> None:
    """Load the tokenizer make_builder will use in this thread, ahead of the benchmark.

    The first load takes seconds (transformers' import: 5-17 s here) and blocks the event loop it runs on;
    a trial does it while its server starts, so the watch on its benchmark is not blind that long.
    """
    path = tokenizer_path(workload, model)
    if path is not None:
        load_tokenizer(str(path))
