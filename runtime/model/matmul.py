"""The CPU matmul choice: x @ weight.T (+ bias) with the faster of two kernels for the input's row count.

Why two: MKL's sgemm (F.linear) is at peak on some CPUs and far below it on others, where oneDNN with
pre-packed weights (the kernel torch.compile's CPU freezing uses) is faster; which wins also differs
between decode-sized and prefill-sized inputs. So both are timed once, at load, on one input of each
size class, and each class keeps the faster. Only when oneDNN wins either are the weights packed, and then
CPU serving holds them twice (the packed copy). Measured figures are in the README's performance section.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


class Matmul:
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
