"""The step's reused buffers: same attention with or without them, memory shared while it fits."""

from __future__ import annotations

import torch

from serving.engine.attention import decode_attention
from serving.engine.workspace import Workspace


def test_take_reuses_memory_and_regrows_for_a_larger_or_other_dtype_request() -> None:
    space = Workspace()
    like = torch.zeros(1)
    first = space.take("k", (4, 8), like)
    smaller = space.take("k", (2, 3), like)
    assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (2, 3) and smaller.is_contiguous()
    larger = space.take("k", (8, 8), like)
    assert larger.shape == (8, 8) and space.take("k", (4, 8), like).data_ptr() == larger.data_ptr()
    assert space.take("k", (4, 8), like.to(torch.bfloat16)).dtype == torch.bfloat16
    assert space.take("v", (4, 8), like).data_ptr() != space.take("k", (4, 8), like).data_ptr()


def test_decode_attention_is_the_same_through_the_workspace_step_after_step() -> None:
    gen = torch.Generator().manual_seed(0)
    block_size, kv_heads, head_dim = 4, 2, 8
    k_cache = torch.randn(16 * block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(16 * block_size, kv_heads, head_dim, generator=gen)
    space = Workspace()
    for batch, width in ((3, 5), (1, 2), (4, 6)):  # shrinking and growing steps share the buffers
        blocks = torch.randint(0, 16, (batch, width), generator=gen)
        lengths = torch.randint(1, width * block_size + 1, (batch,), generator=gen)
        mask = (torch.arange(width * block_size)[None, :] < lengths[:, None]).view(batch, 1, 1, -1)
        q = torch.randn(batch, 4, head_dim, generator=gen)
        fresh = decode_attention(q, k_cache, v_cache, blocks, mask, block_size, None)
        reused = decode_attention(q, k_cache, v_cache, blocks, mask, block_size, None, space)
        assert torch.equal(fresh, reused)
