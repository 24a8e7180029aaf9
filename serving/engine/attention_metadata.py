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
    decode_block_tables: torch.Tensor
    """[num_decode, max blocks] block ids (padding 0, masked)."""
    decode_mask: torch.Tensor
    """[num_decode, 1, 1, max blocks * block_size] True for positions < context length."""
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
    block_tables: torch.Tensor, starts: torch.Tensor, qlens: torch.Tensor, block_size: int, first_token: int
) -> PaddedBatch:
    """Pad rows (their tokens contiguous from first_token) to a [B, Qmax, Lmax] batch."""
    device = block_tables.device
    num_rows = block_tables.shape[0]
    qmax = int(qlens.max())
    lmax = int((starts + qlens).max())
    cu = torch.cumsum(qlens, 0) - qlens + first_token
    i = torch.arange(qmax, device=device)
    query_index = cu[:, None] + torch.minimum(i[None, :], (qlens - 1)[:, None])
    j = torch.arange(lmax, device=device)
    key_slots = block_tables[:, j // block_size] * block_size + j % block_size
    mask = (j[None, None, :] <= (starts[:, None] + i[None, :])[:, :, None]).unsqueeze(1)
    rows = torch.repeat_interleave(torch.arange(num_rows, device=device), qlens)
    offsets = torch.arange(int(qlens.sum()), device=device) - torch.repeat_interleave(cu - first_token, qlens)
    output_index = rows * qmax + offsets
    return PaddedBatch(query_index, key_slots, mask, output_index)


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
    """Metadata for rows given in batch order; the first num_decode rows each decode one token."""
    width = max(len(b) for b in block_tables)
    bt = torch.tensor([b + [0] * (width - len(b)) for b in block_tables], dtype=torch.long, device=device)
    st = torch.tensor(starts, dtype=torch.long, device=device)
    ql = torch.tensor(query_lens, dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(starts), device=device), ql)
    cu = torch.cumsum(ql, 0) - ql
    pos = st[rows] + torch.arange(int(ql.sum()), device=device) - cu[rows]
    slot_mapping = bt[rows, pos // block_size] * block_size + pos % block_size

    query_starts = cu.tolist() if backend == "eager" else []
    context_slots: list[torch.Tensor] = []
    padded = paged = None
    if backend == "eager":
        offsets = torch.arange(width * block_size, device=device)
        for r, (s, q) in enumerate(zip(starts, query_lens, strict=True)):
            context_slots.append((bt[r, offsets // block_size] * block_size + offsets % block_size)[: s + q])
    elif backend == "sdpa":
        padded = _padded(bt, st, ql, block_size, first_token=0)
    else:
        paged = _paged(bt, st, ql, block_size, num_decode)
    return AttentionMetadata(
        kv_caches=kv_caches,
        block_size=block_size,
        slot_mapping=slot_mapping,
        positions=pos,
        query_starts=query_starts,
        query_lens=list(query_lens),
        starts=list(starts),
        context_slots=context_slots,
        padded=padded,
        paged=paged,
    )


def _paged(
    bt: torch.Tensor, st: torch.Tensor, ql: torch.Tensor, block_size: int, num_decode: int
) -> PagedBatch:
    ctx = st[:num_decode] + 1
    nblocks = -(-int(ctx.max()) // block_size) if num_decode else 0
    decode_bt = bt[:num_decode, :nblocks]
    span = torch.arange(nblocks * block_size, device=bt.device)
    decode_mask = (span[None, :] < ctx[:, None]).view(num_decode, 1, 1, nblocks * block_size)
    prefill = None
    if num_decode < bt.shape[0]:
        rest = slice(num_decode, None)
        prefill = _padded(bt[rest], st[rest], ql[rest], block_size, first_token=num_decode)
    return PagedBatch(num_decode, decode_bt, decode_mask, prefill)
