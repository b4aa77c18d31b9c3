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
    write_kv(k, v, k_pool, v_pool, batch.slot_mapping)
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


def write_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """The step's new K/V ([T, kv_heads, dim]) into their cache slots."""
    kv_heads, dim = k.shape[1], k.shape[2]
    k_pool.view(-1, kv_heads, dim)[slot_mapping] = k
    v_pool.view(-1, kv_heads, dim)[slot_mapping] = v


def _gather(pool: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """[N, W] block tables → [N, length, kv_heads, dim] of the cached K or V."""
    n, width = blocks.shape
    return pool.index_select(0, blocks.flatten()).view(n, width * pool.shape[1], *pool.shape[2:])[:, :length]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     slot_mapping: torch.Tensor, blocks: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One query per row (q: [B, heads, dim]) against its context, read through its block table ([B, W])
    up to its length ([B]): the compiled step's attention.

    Written as products and sums rather than SDPA so that the compiler fuses the block-table lookup into
    the loops that read K and V: no row's context is copied out of the pool. (Run eagerly it would
    materialise them, which is why the eager step keeps `paged_attention`.)
    """
    batch, heads, dim = q.shape
    kv_heads, block_size = k.shape[1], k_pool.shape[1]
    write_kv(k, v, k_pool, v_pool, slot_mapping)
    context = blocks.shape[1] * block_size
    keys = k_pool[blocks].view(batch, context, kv_heads, 1, dim)  # [B, L, kv, 1, d]
    values = v_pool[blocks].view(batch, context, kv_heads, 1, dim)
    query = q.view(batch, 1, kv_heads, heads // kv_heads, dim).float()  # [B, 1, kv, group, d]
    scores = (query * keys).sum(-1) * dim ** -0.5  # [B, L, kv, group], accumulated in fp32
    visible = torch.arange(context, device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~visible[:, :, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=1)
    out = (weights[..., None] * values).sum(1)  # [B, kv, group, d]
    return out.reshape(batch, heads, dim).to(q.dtype)
