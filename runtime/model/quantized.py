"""Weight-only quantized linear weights: int8 per output channel, int4 in groups of 32 (as GGUF's Q4 blocks).

Activations stay bf16; only the projection weights are quantized (embeddings, norms and LoRA addons keep
their precision). Decode reads every weight once per step, so fewer bytes per weight is fewer bytes per
token. Each weight keeps what two kernels need: torch's weight-only matmul (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`), fast for a few rows, and a dequantizing path for prefill-sized inputs,
where the matmul is compute-bound and a bf16 matmul wins. `Matmul` times both and picks per row count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT4_GROUP = 32


@dataclass
class Int8Weight:
    """Symmetric per output channel: w ≈ q * scale[n]."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N], the activations' dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> "Int8Weight":
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(dtype))

    def dequantize(self) -> torch.Tensor:
        return self.q.to(self.scale.dtype) * self.scale[:, None]

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.q.shape[1] % 16:
            # torch's CPU kernel (2.13) reads past rows whose width is not a multiple of 16 and crashes.
            return self.dequantized_matmul(x, bias)
        out = torch._weight_int8pack_mm(x, self.q, self.scale)
        return out if bias is None else out + bias

    def dequantized_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # (x @ q.T) * scale: the scale applies to the [rows, N] output, not the larger [N, K] weight.
        out = F.linear(x, self.q.to(x.dtype)) * self.scale
        return out if bias is None else out + bias

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    def numel(self) -> int:
        return self.q.numel()

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


@dataclass
class Int4Weight:
    """Asymmetric in groups of 32 along K: w ≈ q * scale + minimum, q in [0, 15]."""

    packed: torch.Tensor | None  # torch's CPU int4 layout for _weight_int4pack_mm_for_cpu (None off the CPU)
    nibbles: torch.Tensor  # [N, K/2] uint8, two values a byte (low nibble first): the dequantizing path's copy
    scales_and_zeros: torch.Tensor  # [K/32, N, 2] as the kernel wants: scale and (minimum + 8 * scale)
    scale: torch.Tensor  # [N, K/32]
    minimum: torch.Tensor  # [N, K/32]

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> "Int4Weight":
        n, k = weight.shape
        if k % INT4_GROUP or n % 16:  # what torch's int4 packing takes
            raise ValueError(f"precision int4 needs weights whose rows are a multiple of 16 and columns of {INT4_GROUP}; "
                             f"this model has a weight of shape {tuple(weight.shape)}")
        groups = weight.float().view(n, k // INT4_GROUP, INT4_GROUP)
        minimum, maximum = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((maximum - minimum) / 15).clamp(min=1e-12)
        q = torch.round((groups - minimum[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
        # The weight-only kernel is torch's CPU one; on a GPU only the dequantizing path runs (see matmul.py).
        packed = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
                  if weight.device.type == "cpu" else None)
        # The kernel computes (q - 8) * scale + zero.
        scales_and_zeros = torch.stack([scale.t(), (minimum + 8 * scale).t()], dim=-1).contiguous().to(dtype)
        nibbles = q[:, 0::2] | (q[:, 1::2] << 4)
        return cls(packed, nibbles, scales_and_zeros, scale.to(dtype), minimum.to(dtype))

    def dequantize(self) -> torch.Tensor:
        n = self.nibbles.shape[0]
        q = torch.stack([self.nibbles & 15, self.nibbles >> 4], dim=-1).view(n, -1, INT4_GROUP).to(self.scale.dtype)
        return (q * self.scale[..., None] + self.minimum[..., None]).view(n, -1)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scales_and_zeros)
        return out if bias is None else out + bias

    def dequantized_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dequantize(), bias)

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.nibbles.shape[0], self.nibbles.shape[1] * 2])

    @property
    def device(self) -> torch.device:
        return self.nibbles.device

    def numel(self) -> int:
        return self.nibbles.numel() * 2

    @property
    def nbytes(self) -> int:
        """What decode reads: the kernel's packed weight and its scales (the dequantizing copy is prefill's)."""
        if self.packed is None:
            return self.nibbles.nbytes + self.scale.nbytes + self.minimum.nbytes
        return self.packed.nbytes + self.scales_and_zeros.nbytes


QUANTIZED = {"int8": Int8Weight, "int4": Int4Weight}


def quantize_projections(weights, precision: str) -> None:
    """Quantize the model's projection weights and LM head in place (`weights`: a loaded ModelWeights)."""
    kind = QUANTIZED[precision]
    for layer in weights.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, kind.quantize(getattr(layer, name), weights.dtype))
    weights.lm_head = kind.quantize(weights.lm_head, weights.dtype)
