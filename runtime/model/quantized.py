"""Quantized linear weights: int8 per output channel, int4 in groups of 32 (as GGUF's Q4 blocks), fp8 (e4m3)
per output channel.

Activations are stored bf16; only the projection weights are quantized (embeddings, norms and LoRA addons
keep their precision). Decode reads every weight once per step, so fewer bytes per weight is fewer bytes
per token. Each kind names the kernels that can run it (`kernels()`), and `Matmul` times them per row
count and keeps the fastest:
* weight-only: torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`, bf16 activations;
* dynamic int8 (int8 only, CPU): FBGEMM's `quantized::linear_dynamic`, which quantizes each input row to
  int8 on the fly and runs an int8 × int8 GEMM (VNNI or AVX2 `vpmaddubsw`): it wins at every row count
  on the CPUs measured, as llama.cpp's Q8_0 dot products do;
* scaled-mm (fp8 only, GPUs with fp8 tensor cores): each input row quantized to fp8 with its own scale,
  then `torch._scaled_mm`, an fp8 × fp8 GEMM;
* dequantize: the weight (or the product) rescaled in bf16, for prefill sizes where a bf16 GEMM wins; fp8's
  only kernel where the hardware has no fp8 GEMM (on the CPU it is an emulation, there for the tests).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.runtime.model.kernel import Kernel

INT4_GROUP = 32


def _weight_only(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    return weight.matmul(x, bias)


def _dequantized(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    return weight.dequantized_matmul(x, bias)


def _prepack_dynamic(weight: "Int8Weight"):
    """FBGEMM's packed form of the int8 weight (the same values, per-channel scales, zero points 0)."""
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors, the only way into this kernel
        warnings.simplefilter("ignore", UserWarning)
        n = weight.q.shape[0]
        qweight = torch._make_per_channel_quantized_tensor(
            weight.q, weight.scale.double(), torch.zeros(n, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


# Without VNNI, FBGEMM's u8 × s8 products are summed in int16 and can saturate on full-range activations;
# 7-bit activations (reduce_range) avoid it, at about twice the rounding error (still within tolerance).
_REDUCE_RANGE = not torch.cpu._is_vnni_supported()


def _dynamic_int8(x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor:
    # x comes with its rows scaled (Kernel.scaled_rows): the kernel quantizes its whole input with one scale.
    out = torch.ops.quantized.linear_dynamic(x, packed, _REDUCE_RANGE)
    return out if bias is None else out + bias


@dataclass
class ChannelScaled:
    """A weight stored as q [N, K] with one scale per output channel (w ≈ q * scale[n]): int8 and fp8."""

    q: torch.Tensor
    scale: torch.Tensor  # [N]

    def dequantized_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # (x @ q.T) * scale: the scale applies to the [rows, N] output, not the larger [N, K] weight. Every
        # int8 and e4m3 value is exact in bf16, so this is the weight's own product.
        out = (F.linear(x, self.q.to(x.dtype)) * self.scale).to(x.dtype)
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
class Int8Weight(ChannelScaled):
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

    def kernels(self) -> dict:
        """name → (prepare the weight once or None, run it on x with a bias): see matmul.py."""
        kernels = {"dequantize": Kernel(None, _dequantized)}
        if self.device.type == "cpu":
            kernels["weight-only"] = Kernel(None, _weight_only)
            if "fbgemm" in torch.backends.quantized.supported_engines:
                kernels["dynamic-int8"] = Kernel(_prepack_dynamic, _dynamic_int8, scaled_rows=True)
        return kernels

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.q.shape[1] % 16:
            # torch's CPU kernel (2.13) reads past rows whose width is not a multiple of 16 and crashes.
            return self.dequantized_matmul(x, bias)
        out = torch._weight_int8pack_mm(x, self.q, self.scale)
        return out if bias is None else out + bias




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

    def kernels(self) -> dict:
        kernels = {"dequantize": Kernel(None, _dequantized)}
        if self.packed is not None:
            kernels["weight-only"] = Kernel(None, _weight_only)
        return kernels

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


def fp8_hardware(device: torch.device) -> tuple[tuple[int, int] | None, str | None]:
    """(CUDA compute capability, ROCm architecture such as 'gfx942:sramecc+:xnack-') of `device`: the
    architecture is None on NVIDIA, both are None off a GPU."""
    if device.type != "cuda":
        return None, None
    arch = torch.cuda.get_device_properties(device).gcnArchName if torch.version.hip else None
    return torch.cuda.get_device_capability(device), arch


def _is_mi300(hip_arch: str | None) -> bool:
    return hip_arch is not None and hip_arch.startswith("gfx94")


def has_fp8_matmul(capability: tuple[int, int] | None, hip_arch: str | None = None) -> bool:
    """Whether torch._scaled_mm's rowwise fp8 GEMM runs on this GPU: NVIDIA's from compute capability 8.9 on
    (Ada, Hopper: L4, H100, H200), AMD's MI300 (gfx94x). ROCm reports a capability too (9.4 on MI300X, but
    also 9.0 on MI200, which has no fp8), so there the architecture decides."""
    if hip_arch is not None:
        return _is_mi300(hip_arch)
    return capability is not None and tuple(capability) >= (8, 9)


def fp8_dtype(hip_arch: str | None) -> torch.dtype:
    # MI300's fp8 units implement the "fnuz" e4m3 (no negative zero, NaN at 0x80, largest 240), and torch's
    # _scaled_mm there takes only that one; NVIDIA (and the CPU emulation) use OCP's e4m3fn (largest 448).
    return torch.float8_e4m3fnuz if _is_mi300(hip_arch) else torch.float8_e4m3fn


def fp8_kernels(capability: tuple[int, int] | None, hip_arch: str | None = None) -> dict:
    """The kernels an fp8 weight offers on a device of this kind (`fp8_hardware`'s pair)."""
    kernels = {"dequantize": Kernel(None, _dequantized)}
    if has_fp8_matmul(capability, hip_arch):
        kernels["scaled-mm"] = Kernel(_prepare_scaled_mm, _scaled_mm)
    return kernels


# torch._scaled_mm (2.13) takes K and N only in multiples of 16, on CUDA and ROCm alike.
SCALED_MM_ALIGN = 16


@dataclass
class ScaledMmOperand:
    """An fp8 weight as _scaled_mm's second operand, padded where its shape does not fit."""

    q_t: torch.Tensor  # [K', N'] column-major, as _scaled_mm requires: the row-major [N', K'] q, transposed
    scale: torch.Tensor  # [1, N'] fp32
    n: int  # the weight's own output width (the padded columns are cut off)


def _prepare_scaled_mm(weight: "Fp8Weight") -> ScaledMmOperand:
    n, k = weight.q.shape
    q, scale = weight.q, weight.scale
    pad_n, pad_k = -n % SCALED_MM_ALIGN, -k % SCALED_MM_ALIGN
    if pad_n or pad_k:
        # Zero rows and columns add nothing to the product. This copy sits beside the weight (whose layout the
        # dequantizing path reads); only odd widths need it, such as a vocabulary of 32001.
        q = weight.q.new_zeros((n + pad_n, k + pad_k))
        q[:n, :k] = weight.q
        scale = F.pad(scale, (0, pad_n), value=1.0)
    return ScaledMmOperand(q.t(), scale[None, :].contiguous(), n)


def _scaled_mm(x: torch.Tensor, operand: ScaledMmOperand, bias: torch.Tensor | None) -> torch.Tensor:
    fp8 = operand.q_t.dtype
    largest = torch.finfo(fp8).max
    xf = x.float()
    if xf.shape[1] != operand.q_t.shape[0]:
        xf = F.pad(xf, (0, operand.q_t.shape[0] - xf.shape[1]))
    # Each row gets its own scale (rowwise, [M, 1]): one row's outlier does not coarsen the others. The clamp
    # keeps rounding from carrying a value past the largest fp8, which the cast would not saturate everywhere.
    row_scale = (xf.abs().amax(dim=1, keepdim=True) / largest).clamp(min=1e-12)
    x_fp8 = (xf / row_scale).clamp(-largest, largest).to(fp8)
    # out_dtype is the activations' dtype: bf16 for every quantized precision (engine.from_dir), the only one
    # ROCm's rowwise kernel writes. The bias is added after, as the other kernels do: a fused one would have
    # to match out_dtype exactly.
    out = torch._scaled_mm(x_fp8, operand.q_t, scale_a=row_scale, scale_b=operand.scale, out_dtype=x.dtype)
    if out.shape[1] != operand.n:
        out = out[:, :operand.n].contiguous()
    return out if bias is None else out + bias


@dataclass
class Fp8Weight(ChannelScaled):
    """Float8 e4m3 per output channel: w ≈ q.float() * scale[n]."""

    q: torch.Tensor  # [N, K] float8_e4m3fn (float8_e4m3fnuz on MI300)
    scale: torch.Tensor  # [N] fp32 whatever the activations' dtype: _scaled_mm takes only fp32 scales

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> "Fp8Weight":
        fp8 = fp8_dtype(fp8_hardware(weight.device)[1])
        largest = torch.finfo(fp8).max
        w = weight.float()
        scale = (w.abs().amax(dim=1) / largest).clamp(min=1e-12)
        # Clamped: a value rounded past the largest fp8 would become NaN in the cast on some devices.
        q = (w / scale[:, None]).clamp(-largest, largest).to(fp8)
        return cls(q, scale)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def kernels(self) -> dict:
        return fp8_kernels(*fp8_hardware(self.device))




QUANTIZED = {"int8": Int8Weight, "int4": Int4Weight, "fp8": Fp8Weight}
QuantizedWeight = Int8Weight | Int4Weight | Fp8Weight


def quantize_projections(weights, precision: str) -> None:
    """Quantize the model's projection weights and LM head in place (`weights`: a loaded ModelWeights)."""
    kind = QUANTIZED[precision]
    for layer in weights.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            if getattr(layer, name) is not None:
                setattr(layer, name, kind.quantize(getattr(layer, name), weights.dtype))
        # the experts too (their routers stay: small, and the routing is sensitive to them)
        layer.expert_gate_up = [kind.quantize(w, weights.dtype) for w in layer.expert_gate_up]
        layer.expert_down = [kind.quantize(w, weights.dtype) for w in layer.expert_down]
    weights.lm_head = kind.quantize(weights.lm_head, weights.dtype)
