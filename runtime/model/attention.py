"""Attention over the paged KV cache for one step's mixed batch of decode rows and prefill chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.runtime.engine.batch import StepBatch


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends: its scores' scale, its sliding window, its scores' soft cap."""

    scale: float
    window: int | None = None  # tokens a query sees, itself included (None: the whole context)
    softcap: float | None = None  # scores = cap · tanh(scores / cap) (Gemma 2)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None,
            spec: LayerAttention, causal: bool = False) -> torch.Tensor:
    """SDPA where it can serve the layer; soft-capped scores need the product written out (SDPA has no cap)."""
    if spec.softcap is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, is_causal=causal,
                                              scale=spec.scale, enable_gqa=True)
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.tanh(query @ keys.transpose(-1, -2) * spec.scale / spec.softcap) * spec.softcap
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype) @ values


def _visible(query_positions: torch.Tensor, context: int, window: int | None) -> torch.Tensor:
    """[queries, context]: which positions each query sees (causal, and within its window)."""
    keys = torch.arange(context, device=query_positions.device)[None, :]
    visible = keys <= query_positions[:, None]
    if window is not None:
        visible &= keys > query_positions[:, None] - window
    return visible


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    batch: StepBatch, spec: LayerAttention) -> torch.Tensor:
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
        mask = batch.decode_mask
        if spec.window is not None:
            mask = _visible(batch.decode_lengths - 1, batch.decode_len, spec.window)[:, None, None, :]
        out[:nd] = _attend(q[:nd, :, None, :], keys, values, mask, spec)[:, :, 0, :]
    for chunk in batch.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        # [1, heads, tokens, dim]: with a batch dimension, CPU SDPA takes its flash kernel, not the math one.
        query = q[rows].transpose(0, 1)[None]
        # Row i of the chunk sits at position context - length + i and sees positions up to it.
        positions = torch.arange(chunk.context - chunk.length, chunk.context, device=q.device)
        if chunk.context_blocks is None:
            keys, values = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
        else:
            keys = _gather(k_pool, chunk.context_blocks[None], chunk.context).transpose(1, 2)
            values = _gather(v_pool, chunk.context_blocks[None], chunk.context).transpose(1, 2)
        if chunk.context_blocks is None and spec.window is None and spec.softcap is None:
            result = _attend(query, keys, values, None, spec, causal=True)
        else:
            result = _attend(query, keys, values, _visible(positions, chunk.context, spec.window), spec)
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
                     slot_mapping: torch.Tensor, blocks: torch.Tensor, lengths: torch.Tensor,
                     spec: LayerAttention) -> torch.Tensor:
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
    scores = (query * keys).sum(-1) * spec.scale  # [B, L, kv, group], accumulated in fp32
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    visible = torch.arange(context, device=q.device)[None, :] < lengths[:, None]
    if spec.window is not None:
        visible &= torch.arange(context, device=q.device)[None, :] >= lengths[:, None] - spec.window
    scores = scores.masked_fill(~visible[:, :, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=1)
    out = (weights[..., None] * values).sum(1)  # [B, kv, group, d]
    return out.reshape(batch, heads, dim).to(q.dtype)
