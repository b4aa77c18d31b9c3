"""The decoder forward pass over a flat batch of tokens, one for every family Ember serves.

Llama 2/3, Mistral, Qwen2/3, Gemma 2/3, Phi-3, Mixtral and Qwen3-MoE differ in a handful of switches (the
config's `family`): norms on q and k, Gemma's scaled embedding, `1 + weight` norms, norms after attention and
MLP, GeGLU and soft-capping, per-layer sliding windows and RoPE bases, Mixture-of-Experts MLPs. Numerics follow
transformers' implementation of each so logits match it in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ember.runtime.engine.batch import StepBatch
from ember.runtime.engine.kv_cache import KVCache
from ember.runtime.model.attention import LayerAttention, decode_attention, paged_attention
from ember.runtime.model.config import Rope
from ember.runtime.model.loader import ModelWeights
from ember.runtime.model.matmul import Matmul
from ember.runtime.model.projections import Projection
from ember.runtime.parallel.group import RankGroup


def rope_inv_freq(rope: Rope, dim: int, factors: tuple[float, ...] = ()) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.scaling == "linear":
        return inv_freq / rope.factor
    if rope.scaling == "longrope":
        return inv_freq / torch.tensor(factors, dtype=torch.float32)
    if rope.scaling != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _angles(rope: Rope, dim: int, positions: int) -> torch.Tensor:
    steps = torch.arange(positions, dtype=torch.float32)
    if rope.scaling != "longrope":
        return torch.outer(steps, rope_inv_freq(rope, dim))
    # LongRoPE: the short factors within the pre-training context, the long ones past it. transformers switches the
    # whole sequence to the long factors once it is longer, which a KV cache cannot follow; per position is what
    # vLLM serves, and equal to transformers up to original_max_position_embeddings.
    short = torch.outer(steps, rope_inv_freq(rope, dim, rope.short_factor))
    long = torch.outer(steps, rope_inv_freq(rope, dim, rope.long_factor))
    return torch.where(steps[:, None] < rope.original_max_position_embeddings, short, long)


def rope_tables(rope: Rope, dim: int, positions: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's RoPE angles, [positions, head_dim]."""
    angles = _angles(rope, dim, positions)
    angles = torch.cat([angles, angles], dim=-1)
    scale = rope.attention_factor
    return (angles.cos() * scale).to(device, dtype), (angles.sin() * scale).to(device, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 or weight.dtype == torch.float32:
        # Gemma's norms (float32 `1 + weight`) scale in float32 and round once, as transformers does
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps=eps).to(x.dtype)
    # As transformers does for Llama in half precision: normalise in fp32, scale in the model's dtype.
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# Row-parallel projections: under tensor parallelism each rank holds some of their input features, so its product
# is a partial sum, added up across ranks (after the LoRA delta, itself partial; before the bias, added once).
_ROW_PARALLEL = (Projection.O, Projection.DOWN)


class Decoder:
    def __init__(self, weights: ModelWeights, max_positions: int | None = None, group: RankGroup | None = None):
        """`group`: the tensor-parallel ranks this one runs with (`weights` is then its shard); None on one device."""
        self.weights, self.group = weights, group
        self.config = c = weights.config
        self.local = weights.local  # this rank's heads and features (the model's own on one device)
        positions = max_positions or c.max_position_embeddings
        tables = {r: rope_tables(r, c.head_dim, positions, weights.dtype, weights.device) for r in {c.rope, c.local_rope}}
        # Per layer: its RoPE tables (Gemma 3's sliding layers have their own base) and how it attends.
        self.rope = [tables[c.rope if window is None else c.local_rope] for window in c.layer_windows]
        self.attention = [LayerAttention(c.query_scale, window, c.attn_softcap) for window in c.layer_windows]
        self.activation = _gelu_tanh if c.family.gemma else F.silu
        self.embed_scale = torch.tensor(c.hidden_size ** 0.5, dtype=weights.dtype) if c.family.gemma else None
        # Every projection goes through Matmul (its kernel choice, quantized weights), addressed by (layer, name).
        named = []
        for i, layer in enumerate(weights.layers):
            named += [((i, p), getattr(layer, p.value)) for p in Projection if getattr(layer, p.value) is not None]
            named += [((i, "expert", x, part), w) for part, stack in (("gate_up", layer.expert_gate_up),
                                                                      ("down", layer.expert_down))
                      for x, w in enumerate(stack)]
        named.append(("lm_head", weights.lm_head))
        self.index = {key: n for n, (key, _) in enumerate(named)}
        self.matmul = Matmul([w for _, w in named], weights.dtype)
        # The LoRA hook, (layer, projection, input, output, step metadata) → output with the deltas added,
        # and what it needs per step; set by the engine when the deployment serves addons.
        self.lora: Callable | None = None

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def _linear(self, layer: int, projection: Projection, x: torch.Tensor, bias: torch.Tensor | None,
                lora_step) -> torch.Tensor:
        reduced = self.group is not None and projection in _ROW_PARALLEL
        out = self.matmul(x, self.index[(layer, projection)], None if reduced else bias)
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
            return paged_attention(q, k, v, cache.k[i], cache.v[i], batch, self.attention[i])
        return self._logits(batch.input_ids, batch.positions, batch.sample_rows, attend, lora_step)

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
               blocks: torch.Tensor, lengths: torch.Tensor, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor],
               lora_step=None) -> torch.Tensor:
        """Logits of a batch of decode rows, one per sequence (`blocks` [B, W] and `lengths` [B] its contexts):
        what the compiled step traces, so its inputs are tensors whose sizes only vary, no per-step ints."""
        def attend(i, q, k, v):
            return decode_attention(q, k, v, k_pools[i], v_pools[i], slot_mapping, blocks, lengths, self.attention[i])
        return self._logits(input_ids, positions, None, attend, lora_step)

    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor, sample_rows: torch.Tensor | None,
                attend: Callable, lora_step) -> torch.Tensor:
        c, w = self.local, self.weights
        heads, kv_heads, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        tokens = input_ids.shape[0]
        x = w.embed[input_ids]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for i, layer in enumerate(w.layers):
            cos, sin = (table[positions][:, None, :] for table in self.rope[i])
            h = self._norm(x, layer.input_norm)
            qkv = self._linear(i, Projection.QKV, h, layer.qkv_bias, lora_step)
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            attn = attend(i, rope(q, cos, sin), rope(k, cos, sin), v.view(tokens, kv_heads, dim))
            out = self._linear(i, Projection.O, attn.reshape(tokens, c.q_size), layer.o_bias, lora_step)
            x = x + (out if layer.attention_out_norm is None else self._norm(out, layer.attention_out_norm))
            h = self._norm(x, layer.post_norm)
            if layer.router is not None:
                out = self._experts(i, layer, h, lora_step)
            else:
                gate, up = self._linear(i, Projection.GATE_UP, h, None, lora_step).chunk(2, dim=-1)
                out = self._linear(i, Projection.DOWN, self.activation(gate) * up, None, lora_step)
            x = x + (out if layer.mlp_out_norm is None else self._norm(out, layer.mlp_out_norm))
        last = self._norm(x if sample_rows is None else x[sample_rows], w.norm)
        logits = self.matmul(last, self.index["lm_head"])
        logits = (logits if self.group is None else self.group.gather_vocab(logits)).float()
        if c.final_softcap is not None:
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits

    def _experts(self, i: int, layer, h: torch.Tensor, lora_step) -> torch.Tensor:
        """A Mixture-of-Experts MLP: each token's top-k experts by the router's softmax, weighted (renormalised
        where the family does), run grouped by expert over the tokens routed to it."""
        e = self.config.experts
        probs = torch.softmax(F.linear(h, layer.router).float(), dim=-1)
        weights, chosen = probs.topk(e.per_token, dim=-1)  # [T, k]
        if e.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if e.layout == "qwen3_moe":  # Qwen3-MoE weighs in the model's dtype, Mixtral in float32
            weights = weights.to(h.dtype)
        order = chosen.flatten().argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(chosen.flatten(), minlength=e.count).tolist()
        flat_weights = weights.flatten()
        out = torch.zeros_like(h)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            pairs = order[start:start + count]
            start += count
            rows = pairs // e.per_token
            x = h[rows]
            gate_up = self.matmul(x, self.index[(i, "expert", expert, "gate_up")])
            if lora_step is not None:
                gate_up = self.lora.experts(i, "experts.gate_up_proj", expert, rows, x, gate_up, lora_step)
            gate, up = gate_up.chunk(2, dim=-1)
            x = self.activation(gate) * up
            y = self.matmul(x, self.index[(i, "expert", expert, "down")])
            if lora_step is not None:
                y = self.lora.experts(i, "experts.down_proj", expert, rows, x, y, lora_step)
            out.index_add_(0, rows, (y * flat_weights[pairs, None]).to(out.dtype))
        return out if self.group is None else self.group.all_reduce(out)
