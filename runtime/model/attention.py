"""Attention over the paged KV cache for one step's mixed batch of decode rows and prefill chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.runtime.engine.batch import StepBatch


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    batch: StepBatch) -> torch.Tensor:
    """q: [T, heads, dim]; k, v: [T, kv_heads, dim] for the step's new tokens; pools: [blocks, block_size,
    kv_heads, dim]. Returns [T, heads, dim].

    The new K/V are written to their slots first, so decode rows read their own token from the pool.
    Context is gathered a whole block at a time (index_select), several times faster than per slot.
    """
    kv_heads, dim = k.shape[1], k.shape[2]
    k_pool.view(-1, kv_heads, dim)[batch.slot_mapping] = k
    v_pool.view(-1, kv_heads, dim)[batch.slot_mapping] = v
    out = torch.empty_like(q)
    nd = batch.num_decode
    if nd:
        # [B, L, kv, d] → [B, kv, L, d]; positions past a row's length are masked out.
        keys = _gather(k_pool, batch.decode_blocks, batch.decode_len).transpose(1, 2)
        values = _gather(v_pool, batch.decode_blocks, batch.decode_len).transpose(1, 2)
        out[:nd] = F.scaled_dot_product_attention(
            q[:nd, :, None, :], keys, values, attn_mask=batch.decode_mask, enable_gqa=True
        )[:, :, 0, :]
    for chunk in batch.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        # [1, heads, tokens, dim]: with a batch dimension, CPU SDPA takes its flash kernel, not the math one.
        query = q[rows].transpose(0, 1)[None]
        if chunk.context_blocks is None:
            keys, values = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
            result = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
        else:
            keys = _gather(k_pool, chunk.context_blocks[None], chunk.context).transpose(1, 2)
            values = _gather(v_pool, chunk.context_blocks[None], chunk.context).transpose(1, 2)
            # Row i of the chunk sits at position context - length + i and sees positions up to it.
            first = chunk.context - chunk.length
            visible = torch.arange(chunk.context, device=q.device)[None, :] <= (
                first + torch.arange(chunk.length, device=q.device)[:, None]
            )
            result = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, enable_gqa=True)
        out[rows] = result[0].transpose(0, 1)
    return out


def _gather(pool: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """[N, W] block tables → [N, length, kv_heads, dim] of the cached K or V."""
    n, width = blocks.shape
    return pool.index_select(0, blocks.flatten()).view(n, width * pool.shape[1], *pool.shape[2:])[:, :length]
