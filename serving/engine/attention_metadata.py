"""Per-step attention metadata: built once from the scheduled rows, reused by every layer.

Rows are sequences in batch order (decodes first); row r computes tokens at positions
starts[r] .. starts[r] + query_lens[r] - 1 and attends to positions 0 .. starts[r] + query_lens[r] - 1.
Everything is vectorised here so the attention functions run no Python loops per sequence (except eager,
the reference, which loops on purpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.config import AttentionBackend


@dataclass
class PaddedBatch:
    """Rows padded to [B, max query] queries and [B, max context] keys (sdpa backend, paged prefills)."""

    query_index: torch.Tensor
    """[B, Qmax] index of each padded query into the step's tokens (padding repeats a valid index)."""
    key_slots: torch.Tensor
    """[B, Lmax] cache slot of every context position (padding points at slot 0, masked)."""
    mask: torch.Tensor
    """[B, 1, Qmax, Lmax] True where a query may attend: key position <= query position."""
    output_index: torch.Tensor
    """[T] index of each real token into the flattened [B * Qmax] output."""


@dataclass
class PagedBatch:
    """paged backend: decode rows read through block tables; prefill rows as a padded batch."""

    num_decode: int
    """Leading rows (and tokens) that decode one token."""
    decode_blocks: torch.Tensor
    """[num_decode, blocks of the longest context] block table of every decode row (padding: block 0,
    masked): attention gathers whole blocks (block_size slots in one contiguous row each), 16x fewer
    indices than one per slot, and several times faster on the CPU."""
    decode_mask: torch.Tensor | None
    """[num_decode, 1, 1, blocks * block_size] True for positions < the row's context length; None when
    every decode row's context fills exactly those blocks, so SDPA runs unmasked."""
    prefill: PaddedBatch | None
    """The remaining rows, or None when every row decodes."""


@dataclass
class AttentionMetadata:
    """Everything a layer needs to write its K/V and attend over the paged cache."""

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (key, value) caches, each [num_blocks * block_size, KVH, D]."""
    block_size: int
    slot_mapping: torch.Tensor
    """[T] cache slot where each token's K/V is written."""
    positions: torch.Tensor
    """[T] position of each token in its sequence (the model's position_ids)."""
    query_starts: list[int]
    """eager: index of each row's first token in the step."""
    query_lens: list[int]
    starts: list[int]
    """Position of each row's first computed token."""
    context_slots: list[torch.Tensor]
    """eager: per row, the slots of positions 0 .. context length - 1."""
    padded: PaddedBatch | None
    """sdpa backend only."""
    paged: PagedBatch | None
    """paged backend only."""

    def padded_batch(self) -> PaddedBatch:
        if self.padded is None:
            raise RuntimeError("metadata was built for another attention backend than sdpa")
        return self.padded

    def paged_batch(self) -> PagedBatch:
        if self.paged is None:
            raise RuntimeError("metadata was built for another attention backend than paged")
        return self.paged


def _padded(
    block_tables: torch.Tensor, starts: list[int], qlens: list[int], block_size: int, first_token: int
) -> PaddedBatch:
    """Pad rows (their tokens contiguous from first_token) to a [B, Qmax, Lmax] batch."""
    qmax = max(qlens)
    lmax = max(s + q for s, q in zip(starts, qlens, strict=True))
    st = torch.tensor(starts)
    ql = torch.tensor(qlens)
    local = torch.cumsum(ql, 0) - ql
    i = torch.arange(qmax)
    query_index = (local + first_token)[:, None] + torch.minimum(i[None, :], (ql - 1)[:, None])
    j = torch.arange(lmax)
    key_slots = block_tables[:, j // block_size] * block_size + j % block_size
    mask = (j[None, None, :] <= (st[:, None] + i[None, :])[:, :, None]).unsqueeze(1)
    rows = torch.repeat_interleave(torch.arange(len(qlens)), ql)
    offsets = torch.arange(sum(qlens)) - torch.repeat_interleave(local, ql)
    return PaddedBatch(query_index, key_slots, mask, rows * qmax + offsets)


def _paged(
    block_tables: torch.Tensor, starts: list[int], qlens: list[int], block_size: int, num_decode: int
) -> PagedBatch:
    contexts = [s + 1 for s in starts[:num_decode]]
    blocks = -(-max(contexts, default=0) // block_size)
    span = blocks * block_size
    decode_blocks = block_tables[:num_decode, :blocks]
    decode_mask = None
    if any(c != span for c in contexts):
        ctx = torch.tensor(contexts, dtype=torch.long)
        decode_mask = (torch.arange(span)[None, :] < ctx[:, None]).view(num_decode, 1, 1, span)
    prefill = None
    if num_decode < len(starts):
        rest = slice(num_decode, None)
        prefill = _padded(block_tables[rest], starts[rest], qlens[rest], block_size, first_token=num_decode)
    return PagedBatch(num_decode, decode_blocks.contiguous(), decode_mask, prefill)


def build_metadata(
    backend: AttentionBackend,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    block_size: int,
    starts: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    num_decode: int,
    device: torch.device,
) -> AttentionMetadata:
    """Metadata for rows given in batch order; the first num_decode rows each decode one token.

    Index tensors are built on the CPU from Python ints (no device syncs for sizes), then moved once.
    """
    width = max(len(b) for b in block_tables)
    bt = torch.tensor([b + [0] * (width - len(b)) for b in block_tables], dtype=torch.long)
    ql = torch.tensor(query_lens)
    rows = torch.repeat_interleave(torch.arange(len(starts)), ql)
    cu = torch.cumsum(ql, 0) - ql
    pos = torch.tensor(starts)[rows] + torch.arange(sum(query_lens)) - cu[rows]
    slot_mapping = bt[rows, pos // block_size] * block_size + pos % block_size

    context_slots: list[torch.Tensor] = []
    padded = paged = None
    if backend == "eager":
        offsets = torch.arange(width * block_size)
        for r, (s, q) in enumerate(zip(starts, query_lens, strict=True)):
            slots = (bt[r, offsets // block_size] * block_size + offsets % block_size)[: s + q]
            context_slots.append(_to(slots, device))
    elif backend == "sdpa":
        padded = _padded(bt, starts, query_lens, block_size, first_token=0)
        padded = _move_padded(padded, device)
    else:
        paged = _paged(bt, starts, query_lens, block_size, num_decode)
        prefill = paged.prefill
        if prefill is not None:
            prefill = _move_padded(prefill, device)
        mask = None if paged.decode_mask is None else _to(paged.decode_mask, device)
        paged = PagedBatch(num_decode, _to(paged.decode_blocks, device), mask, prefill)
    return AttentionMetadata(
        kv_caches=kv_caches,
        block_size=block_size,
        slot_mapping=_to(slot_mapping, device),
        positions=_to(pos, device),
        query_starts=cu.tolist() if backend == "eager" else [],
        query_lens=list(query_lens),
        starts=list(starts),
        context_slots=context_slots,
        padded=padded,
        paged=paged,
    )


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU index tensor to the model's device without blocking the host."""
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _move_padded(batch: PaddedBatch, device: torch.device) -> PaddedBatch:
    return PaddedBatch(
        _to(batch.query_index, device),
        _to(batch.key_slots, device),
        _to(batch.mask, device),
        _to(batch.output_index, device),
    )
