"""Check prompt token counts against the server's own tokenizer (/tokenize) and re-align any that differ.

A local tokenizer that differs from the server's (another version, another normaliser) would silently change
every prompt length; the server is the authority, as vLLM's bench serve also assumes."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from autotune.traffic.workload import PreparedRequest, PromptBuilder

_ALIGN_STREAM = 4
_MAX_ROUNDS = 8
_PARALLEL = 16


@dataclass(frozen=True)
class AlignmentReport:
    """What the /tokenize check found."""

    server_tokenize: bool
    checked: int = 0
    mismatched: int = 0
    """Prompts whose server count differed from the target before re-alignment."""
    unresolved: int = 0
    """Prompts still off after re-alignment (their prompt_len is the server's count)."""


class _NoTokenize(Exception):
    pass


async def _server_count(client: httpx.AsyncClient, url: str, model: str, req: PreparedRequest) -> int:
    body: dict[str, Any] = {"model": model}
    if req.system is None and req.target_len is not None:
        body["prompt"] = req.prompt
    else:
        body["messages"] = req.messages()
    try:
        response = await client.post(f"{url}/tokenize", json=body)
    except httpx.HTTPError as error:
        raise _NoTokenize(str(error)) from error
    if response.status_code != 200:
        raise _NoTokenize(f"HTTP {response.status_code}")
    data = response.json()
    if "count" in data:
        return int(data["count"])
    if "tokens" in data:
        return len(data["tokens"])
    raise _NoTokenize(f"no count in {sorted(data)}")


async def _align_one(
    client: httpx.AsyncClient, url: str, model: str, builder: PromptBuilder, req: PreparedRequest
) -> tuple[PreparedRequest, bool, bool]:
    """(request with the server's count, was it off, is it still off)."""
    count = await _server_count(client, url, model, req)
    target = req.target_len
    if target is None or count == target:
        return dataclasses.replace(req, prompt_len=count), False, False
    rng = np.random.default_rng([builder.workload.seed, _ALIGN_STREAM, req.index])
    units = list(req.units)
    for _ in range(_MAX_ROUNDS):
        units = builder.adjust(units, count - target, rng)
        req = dataclasses.replace(req, prompt=builder.full_text(builder.render(units)), units=tuple(units))
        count = await _server_count(client, url, model, req)
        if count == target:
            break
    return dataclasses.replace(req, prompt_len=count), True, count != target


async def align_with_server(
    url: str, model: str, builder: PromptBuilder, requests: list[PreparedRequest]
) -> tuple[list[PreparedRequest], AlignmentReport]:
    """Requests whose prompt_len is the server's count (re-aligned to target); unchanged without /tokenize."""
    if not requests:
        return requests, AlignmentReport(server_tokenize=False)
    async with httpx.AsyncClient(timeout=60.0) as client:
        try:
            await _server_count(client, url, model, requests[0])
        except _NoTokenize:
            return requests, AlignmentReport(server_tokenize=False)
        gate = asyncio.Semaphore(_PARALLEL)

        async def one(req: PreparedRequest) -> tuple[PreparedRequest, bool, bool]:
            async with gate:
                return await _align_one(client, url, model, builder, req)

        results = await asyncio.gather(*(one(r) for r in requests))
    report = AlignmentReport(
        server_tokenize=True,
        checked=len(results),
        mismatched=sum(off for _, off, _ in results),
        unresolved=sum(still for _, _, still in results),
    )
    return [r for r, _, _ in results], report
