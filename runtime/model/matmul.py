"""The CPU matmul choice: x @ weight.T (+ bias) with the fastest kernel for the input's row count.

Why several: MKL's sgemm (F.linear) is at peak on some CPUs and far below it on others, where oneDNN with
pre-packed weights (the kernel torch.compile's CPU freezing uses) is faster; bf16 on CPUs with AMX is
fastest through oneDNN's packed weights; quantized weights have a weight-only kernel, fast for a few rows,
and a dequantizing path that wins on prefill-sized inputs. Which wins differs between one row, a decode
batch and a prefill chunk, and between CPUs. So the candidates are timed once, at load, on the model's
own first weight with an input of each size class, and each class keeps the fastest. Only a kernel some
class chose prepares its copy of the weights (oneDNN's packed copy doubles CPU memory when it wins).
Measured figures are in the README's performance section.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ember.runtime.model.quantized import Int4Weight, Int8Weight

Weight = torch.Tensor | Int8Weight | Int4Weight
# name → (prepare the weight once, run it on x with a bias)
Kernel = tuple[Callable[[Weight], object], Callable[[torch.Tensor, object, torch.Tensor | None], torch.Tensor]]


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _same(weight):
    return weight


def _weight_only(x: torch.Tensor, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return weight.matmul(x, bias)


def _dequantized(x: torch.Tensor, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return weight.dequantized_matmul(x, bias)


def candidates(probe: Weight) -> dict[str, Kernel]:
    if isinstance(probe, (Int8Weight, Int4Weight)):
        kernels = {"dequantize": (_same, _dequantized)}
        if probe.device.type == "cpu":
            kernels["weight-only"] = (_same, _weight_only)
        return kernels
    kernels = {"linear": (_same, F.linear)}
    if (probe.device.type == "cpu" and probe.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()):
        try:
            _onednn(torch.zeros(1, probe.shape[1], dtype=probe.dtype), _pack(probe), None)
            kernels["onednn"] = (_pack, _onednn)
        except (AttributeError, RuntimeError):  # a torch build without these oneDNN ops
            pass
    return kernels


class Matmul:
    ROW_CLASSES = ((2, 1), (64, 16), (None, 256))  # (most rows in the class, rows of its probe input)

    def __init__(self, weights: list[Weight], dtype: torch.dtype):
        probe = weights[0]
        kernels = candidates(probe)
        self.choice: list[str] = []
        for _, rows in self.ROW_CLASSES:
            x = torch.randn(rows, probe.shape[1], dtype=dtype, device=probe.device)
            timings = {name: _seconds(run, x, prepare(probe), None) for name, (prepare, run) in kernels.items()}
            self.choice.append(min(timings, key=timings.get) if len(kernels) > 1 else next(iter(kernels)))
        self.run = {name: kernels[name][1] for name in set(self.choice)}
        self.prepared = {name: {id(w): kernels[name][0](w) for w in weights}
                         for name in self.run if kernels[name][0] is not _same}

    def kernel(self, rows: int) -> str:
        return next(name for (most, _), name in zip(self.ROW_CLASSES, self.choice) if most is None or rows <= most)

    def __call__(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        name = self.kernel(x.shape[0])
        prepared = self.prepared.get(name)
        return self.run[name](x, weight if prepared is None else prepared[id(weight)], bias)


def _seconds(kernel, *args, repeats: int = 5) -> float:
    """The best of a few timed calls after a warm-up: what a kernel costs without the noise."""
    kernel(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        kernel(*args)
        best = min(best, time.perf_counter() - start)
    return best
