"""Log-probabilities of sampled and prompt tokens, computed from the step's raw logits.

As vLLM's default (`raw_logprobs`): log_softmax of the model's logits before temperature and top_p,
so a greedy and a sampled request report the same distribution. The runner asks the collector which
prompt positions need logits (prompt logprobs, for `echo`), runs the step, then hands it the logits;
the engine attaches what was collected to the step's RequestOutputs. Prompt logprobs are computed once
per request: a preempted request recomputing its prompt does not compute them again.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from serving.engine.outputs import RequestOutput, TokenLogprob
from serving.engine.scheduler import ScheduledSequence


@dataclass
class _PromptSpan:
    """Prompt positions of one row of this step whose logits were kept: logits row i scores token i + 1."""

    request_id: str
    first_position: int
    next_tokens: list[int]
    num_top: int


@dataclass
class LogprobsCollector:
    """Per-request logprobs between the runner's step and the engine's outputs."""

    _prompt: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    """Prompt logprobs collected so far (positions 1..), until the first output carries them."""
    _prompt_sent: set[str] = field(default_factory=set)
    _sampled: dict[str, TokenLogprob] = field(default_factory=dict)
    _spans: list[_PromptSpan] = field(default_factory=list)

    def prompt_positions(self, rows: Seq[ScheduledSequence], offsets: Seq[int]) -> list[int]:
        """Flat input indices whose logits this step must keep for prompt logprobs (after the sampled ones).

        offsets[i] is where rows[i]'s tokens start in the flattened step.
        """
        self._spans = []
        keep: list[int] = []
        for row, offset in zip(rows, offsets, strict=True):
            seq = row.seq
            wanted = seq.params.prompt_logprobs
            if wanted is None or seq.request_id in self._prompt_sent:
                continue
            done = len(self._prompt.setdefault(seq.request_id, []))
            end = min(row.start + row.num_tokens, seq.num_prompt_tokens - 1)
            first = max(row.start, done)  # position p scores prompt token p + 1
            if first >= end:
                continue
            keep.extend(offset + p - row.start for p in range(first, end))
            next_tokens = seq.prompt_token_ids[first + 1 : end + 1]
            self._spans.append(_PromptSpan(seq.request_id, first, next_tokens, wanted))
        return keep

    def record(self, logits: torch.Tensor, sampling_rows: Seq[ScheduledSequence], tokens: Seq[int]) -> None:
        """Logprobs from this step's kept logits: one row per sampling row, then the prompt positions."""
        asked = [i for i, r in enumerate(sampling_rows) if r.seq.params.logprobs is not None]
        for i, lp in zip(
            asked, _score(logits, asked, [tokens[i] for i in asked], sampling_rows), strict=True
        ):
            self._sampled[sampling_rows[i].seq.request_id] = lp
        start = len(sampling_rows)
        for span in self._spans:
            index = list(range(start, start + len(span.next_tokens)))
            start += len(span.next_tokens)
            scored = _score_rows(logits, index, span.next_tokens, span.num_top)
            self._prompt[span.request_id].extend(scored)
        self._spans = []

    def attach(self, outputs: Seq[RequestOutput]) -> None:
        """Move this step's logprobs onto the outputs (prompt logprobs onto a request's first output)."""
        for out in outputs:
            sampled = self._sampled.pop(out.request_id, None)
            if sampled is not None:
                out.new_logprobs = [sampled]
            prompt = self._prompt.pop(out.request_id, None)
            if prompt is not None:  # the first output: the whole prompt has been computed
                out.prompt_logprobs = prompt
                self._prompt_sent.add(out.request_id)

    def is_empty(self) -> bool:
        """Nothing held for any request (tests check finished requests leave nothing behind)."""
        return not (self._prompt or self._prompt_sent or self._sampled or self._spans)

    def release(self, request_id: str) -> None:
        self._prompt.pop(request_id, None)
        self._prompt_sent.discard(request_id)
        self._sampled.pop(request_id, None)


def _score(
    logits: torch.Tensor, index: list[int], chosen: list[int], rows: Seq[ScheduledSequence]
) -> list[TokenLogprob]:
    """Sampled tokens of some rows; each row asks for its own number of alternatives."""
    if not index:
        return []
    widest = max(rows[i].seq.params.logprobs or 0 for i in index)
    scored = _score_rows(logits, index, chosen, widest)
    return [
        TokenLogprob(s.token_id, s.logprob, s.rank, s.top[: rows[i].seq.params.logprobs or 0])
        for i, s in zip(index, scored, strict=True)
    ]


def _score_rows(logits: torch.Tensor, index: list[int], chosen: Seq[int], num_top: int) -> list[TokenLogprob]:
    """log_softmax of the chosen rows, the chosen token's logprob and rank, the top num_top; one transfer."""
    rows = torch.log_softmax(logits[index].float(), dim=-1)
    picked = torch.tensor(chosen, dtype=torch.long, device=rows.device)
    chosen_lp = rows.gather(1, picked[:, None]).squeeze(1)
    ranks = (rows > chosen_lp[:, None]).sum(dim=-1) + 1
    top_lp, top_ids = rows.topk(num_top, dim=-1)
    result = []
    for token, lp, rank, ids, lps in zip(
        chosen, chosen_lp.tolist(), ranks.tolist(), top_ids.tolist(), top_lp.tolist(), strict=True
    ):
        result.append(TokenLogprob(int(token), float(lp), int(rank), tuple(zip(ids, lps, strict=True))))
    return result
