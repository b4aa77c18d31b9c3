"""The Llama-family forward pass (Llama 2/3, Mistral, Qwen2) over a flat batch of tokens.

RMSNorm, RoPE (with Llama 3.1 scaling), grouped-query attention on the paged KV cache, SwiGLU, tied or
untied embeddings. Numerics follow transformers' implementation so logits match it in fp32.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ember.runtime.model.attention import paged_attention
from ember.runtime.engine.batch import StepBatch
from ember.runtime.model.config import ModelConfig
from ember.runtime.engine.kv_cache import KVCache
from ember.runtime.model.loader import ModelWeights


class Matmul:
    """x @ weight.T (+ bias), with the faster of two CPU kernels for the input's row count.

    F.linear calls MKL's sgemm, which on some CPUs stays far below peak: on the AVX-512 AMD EPYC this
    project's CI ran on it reached 190-220 GFLOPS where oneDNN with weights pre-packed (the kernel
    torch.compile's CPU freezing uses) reached 380-500, at every row count; on the AVX2 machine of an
    earlier run, MKL was at peak for prefill-sized inputs and oneDNN won only for decode-sized ones. So
    both kernels are timed once, at load, on a decode-sized and a prefill-sized input, and each size
    class keeps the faster one. Only when oneDNN wins either are the weights packed, and then CPU serving
    holds them twice (the packed copy).
    """

    SMALL_ROWS = 64
    PROBE_ROWS = {True: 16, False: 256}  # keyed by "is small"

    def __init__(self, weights: list[torch.Tensor]):
        self.packed: dict[int, torch.Tensor] = {}
        self.packed_wins = {True: False, False: False}
        probe = weights[0]
        if probe.device.type != "cpu" or probe.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return
        try:
            packed_probe = _pack(probe)
        except (AttributeError, RuntimeError):  # a torch build without these oneDNN ops
            return
        for small, rows in self.PROBE_ROWS.items():
            x = torch.randn(rows, probe.shape[1])
            self.packed_wins[small] = _seconds(_onednn, x, packed_probe, None) < _seconds(F.linear, x, probe, None)
        if any(self.packed_wins.values()):
            self.packed = {w.data_ptr(): _pack(w) for w in weights}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed_wins[x.shape[0] <= self.SMALL_ROWS]:
            packed = self.packed.get(weight.data_ptr())
            if packed is not None:
                return _onednn(x, packed, bias)
        return F.linear(x, weight, bias)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _seconds(kernel, *args, repeats: int = 5) -> float:
    """The best of a few timed calls after a warm-up: what a kernel costs without the noise."""
    kernel(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        kernel(*args)
        best = min(best, time.perf_counter() - start)
    return best


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


class Llama:
    def __init__(self, weights: ModelWeights, max_positions: int | None = None):
        self.weights = weights
        self.config = c = weights.config
        positions = torch.arange(max_positions or c.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(c))
        angles = torch.cat([freqs, freqs], dim=-1)
        self.cos = angles.cos().to(device=weights.device, dtype=weights.dtype)
        self.sin = angles.sin().to(device=weights.device, dtype=weights.dtype)
        self.matmul = Matmul([t for layer in weights.layers for t in (layer.qkv, layer.o, layer.gate_up, layer.down)]
                             + [weights.lm_head])
        # A hook for LoRA: (layer index, module name, input, output, batch) → output with the delta added.
        self.lora = None

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps=self.config.rms_norm_eps)
        # As transformers does for half precision: normalise in fp32, scale in the model's dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.config.rms_norm_eps)
        return weight * normed.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _linear(self, layer: int, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                batch: StepBatch) -> torch.Tensor:
        out = self.matmul(x, weight, bias)
        if self.lora is not None and batch.adapter_rows is not None:
            out = self.lora(layer, name, x, out, batch)
        return out

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Logits (float32) of the batch's sample rows: [S, vocab]."""
        c, w = self.config, self.weights
        heads, kv_heads, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        tokens = batch.input_ids.shape[0]
        cos, sin = self.cos[batch.positions][:, None, :], self.sin[batch.positions][:, None, :]
        x = w.embed[batch.input_ids]
        for i, layer in enumerate(w.layers):
            h = self._norm(x, layer.input_norm)
            qkv = self._linear(i, "qkv", h, layer.qkv, layer.qkv_bias, batch)
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = self._rope(q.view(tokens, heads, dim), cos, sin)
            k = self._rope(k.view(tokens, kv_heads, dim), cos, sin)
            attn = paged_attention(q, k, v.view(tokens, kv_heads, dim), cache.k[i], cache.v[i], batch)
            x = x + self._linear(i, "o", attn.view(tokens, c.q_size), layer.o, layer.o_bias, batch)
            h = self._norm(x, layer.post_norm)
            gate, up = self._linear(i, "gate_up", h, layer.gate_up, None, batch).chunk(2, dim=-1)
            x = x + self._linear(i, "down", F.silu(gate) * up, layer.down, None, batch)
        last = self._norm(x[batch.sample_rows], w.norm)
        return self.matmul(last, w.lm_head).float()
