"""The Llama-family forward pass (Llama 2/3, Mistral, Qwen2) over a flat batch of tokens.

RMSNorm, RoPE (with Llama 3.1 scaling), grouped-query attention on the paged KV cache, SwiGLU, tied or
untied embeddings. Numerics follow transformers' implementation so logits match it in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ember.runtime.engine.batch import StepBatch
from ember.runtime.engine.kv_cache import KVCache
from ember.runtime.model.attention import decode_attention, paged_attention
from ember.runtime.model.config import ModelConfig
from ember.runtime.model.loader import ModelWeights
from ember.runtime.model.matmul import Matmul
from ember.runtime.model.projections import Projection
from ember.runtime.parallel.group import RankGroup


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(weights: ModelWeights, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's RoPE angles, [positions, head_dim], in the weights' dtype and device."""
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), rope_inv_freq(weights.config))
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(weights.device, weights.dtype), angles.sin().to(weights.device, weights.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
    # As transformers does for half precision: normalise in fp32, scale in the model's dtype.
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


_ORDER = {p: i for i, p in enumerate(Projection)}


# Row-parallel projections: under tensor parallelism each rank holds some of their input features, so its product
# is a partial sum, added up across ranks (after the LoRA delta, itself partial; before the bias, added once).
_ROW_PARALLEL = (Projection.O, Projection.DOWN)


class Llama:
    def __init__(self, weights: ModelWeights, max_positions: int | None = None, group: RankGroup | None = None):
        """`group`: the tensor-parallel ranks this one runs with (`weights` is then its shard); None on one device."""
        self.weights, self.group = weights, group
        self.config = c = weights.config
        self.local = weights.local  # this rank's heads and features (the model's own on one device)
        self.cos, self.sin = rope_tables(weights, max_positions or c.max_position_embeddings)
        # The projections in Matmul's order: four per layer (Projection's order), then the LM head.
        self.matmul = Matmul([getattr(layer, p.value) for layer in weights.layers for p in Projection]
                             + [weights.lm_head], weights.dtype)
        # The LoRA hook, (layer, projection, input, output, step metadata) → output with the deltas added,
        # and what it needs per step; set by the engine when the deployment serves addons.
        self.lora: Callable | None = None

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def _linear(self, layer: int, projection: Projection, x: torch.Tensor, bias: torch.Tensor | None,
                lora_step) -> torch.Tensor:
        reduced = self.group is not None and projection in _ROW_PARALLEL
        out = self.matmul(x, layer * len(Projection) + _ORDER[projection], None if reduced else bias)
        if lora_step is not None:
            out = self.lora(layer, projection, x, out, lora_step)
        if reduced:
            out = self.group.all_reduce(out)
            if bias is not None:
                out = out + bias
        return out

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: KVCache, lora_step=None) -> torch.Tensor:
        """Logits (float32) of the batch's sample rows: [S, vocab]. `lora_step` is the LoRA hook's metadata
        for this batch (None when no row uses an addon)."""
        def attend(i, q, k, v):
            return paged_attention(q, k, v, cache.k[i], cache.v[i], batch)
        return self._logits(batch.input_ids, batch.positions, batch.sample_rows, attend, lora_step)

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
               blocks: torch.Tensor, lengths: torch.Tensor, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor],
               lora_step=None) -> torch.Tensor:
        """Logits of a batch of decode rows, one per sequence (`blocks` [B, W] and `lengths` [B] its contexts):
        what the compiled step traces, so its inputs are tensors whose sizes only vary, no per-step ints."""
        def attend(i, q, k, v):
            return decode_attention(q, k, v, k_pools[i], v_pools[i], slot_mapping, blocks, lengths)
        return self._logits(input_ids, positions, None, attend, lora_step)

    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor, sample_rows: torch.Tensor | None,
                attend: Callable, lora_step) -> torch.Tensor:
        c, w = self.local, self.weights
        heads, kv_heads, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        tokens = input_ids.shape[0]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        x = w.embed[input_ids]
        for i, layer in enumerate(w.layers):
            h = self._norm(x, layer.input_norm)
            qkv = self._linear(i, Projection.QKV, h, layer.qkv_bias, lora_step)
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = rope(q.view(tokens, heads, dim), cos, sin)
            k = rope(k.view(tokens, kv_heads, dim), cos, sin)
            attn = attend(i, q, k, v.view(tokens, kv_heads, dim))
            x = x + self._linear(i, Projection.O, attn.reshape(tokens, c.q_size), layer.o_bias, lora_step)
            h = self._norm(x, layer.post_norm)
            gate, up = self._linear(i, Projection.GATE_UP, h, None, lora_step).chunk(2, dim=-1)
            x = x + self._linear(i, Projection.DOWN, F.silu(gate) * up, None, lora_step)
        last = self._norm(x if sample_rows is None else x[sample_rows], w.norm)
        logits = self.matmul(last, len(w.layers) * len(Projection))
        return (logits if self.group is None else self.group.gather_vocab(logits)).float()
