"""The fidelity probe through the OpenAI API only: build the probe set, generate, score, compare.

The reference generates a greedy continuation of each probe prompt once per study. Every deployment (the
reference too) is then scored teacher-forced on the same token ids: one `/v1/completions` request with
`echo`, `logprobs` and `return_tokens_as_token_ids` returns, at every position, the logprob of the token
that is there and the top-k alternatives. On the same positions and contexts:

- token agreement: share of continuation positions where the trial's most likely token is the
  reference's greedy token;
- mean KL(reference || trial) over every scored position, estimated from the reference's top-k with one
  bucket for the rest of the vocabulary; a token outside the trial's top-k gets the trial's k-th logprob
  (an upper bound), so the estimate is 0 exactly when both agree and grows with any difference;
- perplexity of the reference's continuations under the trial (the probe prompts are workload text,
  random tokens for synthetic workloads; the continuations are the model's own text).
Requests go one at a time, so the scores do not depend on batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx

from autotune.traffic.config import WorkloadConfig
from autotune.traffic.workload import make_builder

PROBE_STREAM = 7
"""Random stream of the probe prompts: disjoint from the benchmark's timed and warm-up requests."""
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Scored:
    """One probe sequence as one deployment scores it; position 0 (nothing before it) has no entry."""

    tokens: list[int]
    """The token ids at positions 1..len-1."""
    logprobs: list[float]
    """logprob of token i given tokens < i, for i = 1..len-1."""
    top: list[dict[int, float]]
    """The top-k (token id -> logprob) at the same positions."""

    def to_json(self) -> dict[str, Any]:
        top = [{str(k): v for k, v in t.items()} for t in self.top]
        return {"tokens": self.tokens, "logprobs": self.logprobs, "top": top}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scored:
        top = [{int(k): float(v) for k, v in t.items()} for t in data["top"]]
        return cls([int(t) for t in data["tokens"]], [float(v) for v in data["logprobs"]], top)


def probe_texts(workload: WorkloadConfig, model: str, count: int, seed: int) -> list[dict[str, Any]]:
    """Seeded prompts of the study's workload, as /tokenize bodies (text, or chat messages)."""
    builder = make_builder(WorkloadConfig(**{**workload.__dict__, "seed": seed}), model)
    bodies = []
    for i in range(count):
        req = builder.build_one(i, PROBE_STREAM)
        bodies.append(
            {"prompt": req.prompt} if workload.api == "completions" else {"messages": req.messages()}
        )
    return bodies


class ProbeClient:
    """The OpenAI-API calls of the probe against one server."""

    def __init__(self, url: str, model: str) -> None:
        self.model = model
        self.http = httpx.Client(base_url=url, timeout=TIMEOUT_S)

    def close(self) -> None:
        self.http.close()

    def tokenize(self, body: dict[str, Any]) -> list[int]:
        return [int(t) for t in self._post("/tokenize", {"model": self.model, **body})["tokens"]]

    def continue_greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The greedy continuation's token ids (ignore_eos: every probe has the same length)."""
        body = self._completion(prompt, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
        return [_token_id(t) for t in body["choices"][0]["logprobs"]["tokens"]]

    def score(self, tokens: list[int], top_k: int) -> Scored:
        """Teacher-forced logprobs of `tokens` (echo, one extra generated token, dropped)."""
        body = self._completion(tokens, max_tokens=1, logprobs=top_k, echo=True)
        lp = body["choices"][0]["logprobs"]
        n = len(tokens)
        logprobs = [float(v) for v in lp["token_logprobs"][1:n]]
        top = [{_token_id(k): float(v) for k, v in t.items()} for t in lp["top_logprobs"][1:n]]
        return Scored(tokens[1:], logprobs, top)

    def _completion(self, prompt: list[int], **fields: Any) -> dict[str, Any]:
        body = {
            "model": self.model,
            "prompt": prompt,
            "temperature": 0,
            "return_tokens_as_token_ids": True,
            **fields,
        }
        return self._post("/v1/completions", body)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = self.http.post(path, json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"{path} answered {reply.status_code}: {reply.text[:300]}")
        data: dict[str, Any] = reply.json()
        return data


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise RuntimeError(f"the server ignored return_tokens_as_token_ids (token {token!r})")
    return int(token.removeprefix("token_id:"))


@dataclass(frozen=True)
class Fidelity:
    """How close a trial's scores are to the reference's over the whole probe set."""

    token_agreement: float
    mean_kl: float
    perplexity: float
    reference_perplexity: float

    def metrics(self) -> dict[str, float]:
        return {
            "quality_token_agreement": self.token_agreement,
            "quality_mean_kl": self.mean_kl,
            "quality_perplexity": self.perplexity,
            "quality_perplexity_ratio": self.perplexity / self.reference_perplexity,
        }


def compare(reference: list[Scored], trial: list[Scored], continuation_lens: list[int]) -> Fidelity:
    """Fidelity of `trial` to `reference`, position by position (continuations end each sequence)."""
    agree = total = 0
    kls: list[float] = []
    trial_lp: list[float] = []
    ref_lp: list[float] = []
    for ref, cand, cont in zip(reference, trial, continuation_lens, strict=True):
        if len(ref.top) != len(cand.top):
            raise RuntimeError(f"scored {len(cand.top)} positions, the reference {len(ref.top)}")
        start = len(ref.top) - cont
        for i, (ref_top, cand_top) in enumerate(zip(ref.top, cand.top, strict=True)):
            kls.append(top_k_kl(ref_top, cand_top))
            if i >= start:
                total += 1
                agree += max(cand_top, key=cand_top.__getitem__) == ref.tokens[i]
        trial_lp += cand.logprobs[start:]
        ref_lp += ref.logprobs[start:]
    return Fidelity(
        token_agreement=agree / total if total else 1.0,
        mean_kl=sum(kls) / len(kls) if kls else 0.0,
        perplexity=math.exp(-sum(trial_lp) / len(trial_lp)),
        reference_perplexity=math.exp(-sum(ref_lp) / len(ref_lp)),
    )


def top_k_kl(ref: dict[int, float], cand: dict[int, float]) -> float:
    """KL(ref || cand) over ref's top-k plus one bucket for the rest of the vocabulary (nats, >= 0)."""
    floor = min(cand.values())
    p = {t: math.exp(lp) for t, lp in ref.items()}
    q = {t: math.exp(cand.get(t, floor)) for t in ref}
    p_rest, q_rest = max(1.0 - sum(p.values()), 0.0), max(1.0 - sum(q.values()), 1e-12)
    kl = sum(pt * (math.log(pt) - math.log(max(q[t], 1e-30))) for t, pt in p.items() if pt > 0)
    if p_rest > 0:
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return max(kl, 0.0)
