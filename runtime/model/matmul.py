"""The CPU matmul choice: x @ weight.T (+ bias) with the fastest kernel for the input's row count.

Why several: MKL's sgemm (F.linear) is at peak on some CPUs and far below it on others, where oneDNN with
pre-packed weights (the kernel torch.compile's CPU freezing uses) is faster; bf16 on CPUs with AMX is
fastest through oneDNN's packed weights; quantized weights have a weight-only kernel, fast for a few rows,
and a dequantizing path that wins on prefill-sized inputs. Which wins differs between one row, a decode
batch and a prefill chunk, and between CPUs. So the candidates are timed once, at load, on one weight of
each of the model's shapes with an input of each size class, and each class keeps the fastest. Measured
figures are in the README's performance section.
"""

from __future__ import annotations

import functools
import itertools
import time
import weakref

import torch
import torch.nn.functional as F

from ember.runtime.model.kernel import Kernel
from ember.runtime.model.quantized import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def candidates(probe: Weight) -> dict[str, Kernel]:
    if not isinstance(probe, torch.Tensor):  # a quantized weight names its own kernels
        return probe.kernels()
    kernels = {"linear": Kernel(None, F.linear)}
    if (probe.device.type == "cpu" and probe.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()):
        try:
            _onednn(torch.zeros(1, probe.shape[1], dtype=probe.dtype), _pack(probe), None)
            kernels["onednn"] = Kernel(_pack, _onednn)
        except (AttributeError, RuntimeError):  # a torch build without these oneDNN ops
            pass
    return kernels


class Matmul:
    """The model's projections, each addressed by its index in the list given at load."""

    ROW_CLASSES = ((2, 1), (64, 16), (None, 256))  # (most rows in the class, rows of its probe input)
    ROUNDS = 3

    def __init__(self, weights: list[Weight], dtype: torch.dtype):
        self.weights = weights
        # The probes: one weight of each shape (a layer's projections), so the choice is not one shape's luck.
        probes = list({tuple(w.shape): w for w in weights}.values())
        kernels = candidates(probes[0])
        self.choice: list[str] = []
        for _, rows in self.ROW_CLASSES:
            if len(kernels) == 1:
                self.choice.append(next(iter(kernels)))
                continue
            inputs = [torch.randn(rows, p.shape[1], dtype=dtype, device=p.device) for p in probes]
            prepared = {name: [p if k.prepare is None else k.prepare(p) for p in probes] for name, k in kernels.items()}
            # Candidates take turns, round after round, and each keeps its best per probe: a burst of noise
            # (another process, a clock ramping up) then costs one round, not one candidate.
            best = {name: [float("inf")] * len(probes) for name in kernels}
            for _ in range(self.ROUNDS):
                for name, kernel in kernels.items():
                    for i, x in enumerate(inputs):
                        best[name][i] = min(best[name][i], _seconds(_scaled(kernel), x, prepared[name][i], None))
            self.choice.append(min(best, key=lambda name: sum(best[name])))
        self.kernels = {name: kernels[name] for name in set(self.choice)}
        self._by_class = [kernels[name] for name in self.choice]
        # Only a kernel some class chose prepares its copy (oneDNN's packed copy doubles CPU memory).
        self.prepared = {name: [k.prepare(w) for w in weights] for name, k in self.kernels.items() if k.prepare}
        self._prepared_by_class = [self.prepared.get(name) for name in self.choice]
        self.handle = next(_HANDLES)
        _MATMULS[self.handle] = self

    def kernel(self, rows: int) -> str:
        return self.choice[self._class(rows)]

    def _class(self, rows: int) -> int:
        return next(i for i, (most, _) in enumerate(self.ROW_CLASSES) if most is None or rows <= most)

    def scales_rows(self, most_rows: int) -> bool:
        """Whether every kernel used for up to `most_rows` rows wants its input rows scaled."""
        return all(k.scaled_rows for k in self._by_class[:self._class(most_rows) + 1])

    def __call__(self, x: torch.Tensor, index: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # A compiled step calls the same measured kernels, through one opaque op the compiler fuses
            # around; where all its kernels want scaled rows, the scaling is fused into the graph too.
            if self.scales_rows(COMPILED_MOST_ROWS):
                out = _with_scaled_rows(lambda rows: torch.ops.ember.matmul(rows, self.handle, index, True), x)
            else:
                out = torch.ops.ember.matmul(x, self.handle, index, False)
            return out if bias is None else out + bias
        return self.apply(x, index, bias)

    def apply(self, x: torch.Tensor, index: int, bias: torch.Tensor | None = None, scaled: bool = False) -> torch.Tensor:
        """x @ weights[index].T + bias; `scaled`: x's rows come scaled (see Kernel.scaled_rows)."""
        c = self._class(x.shape[0])
        kernel, prepared = self._by_class[c], self._prepared_by_class[c]
        weight = self.weights[index] if prepared is None else prepared[index]
        if kernel.scaled_rows and not scaled:
            return _scaled(kernel)(x, weight, bias)
        return kernel.run(x, weight, bias)

    def out_features(self, index: int) -> int:
        return self.weights[index].shape[0]


# The compiled step takes decode batches of at most this many rows (Matmul's middle row class).
COMPILED_MOST_ROWS = Matmul.ROW_CLASSES[1][0]


def _with_scaled_rows(matmul, x: torch.Tensor) -> torch.Tensor:
    """`matmul` of x with each row divided by its largest magnitude (in fp32), the output rows scaled back."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return (matmul(x.float() / scale) * scale).to(x.dtype)


def _scaled(kernel: Kernel):
    """The kernel's run on unscaled input (see Kernel.scaled_rows)."""
    if not kernel.scaled_rows:
        return kernel.run

    @functools.wraps(kernel.run)
    def run(x, weight, bias):
        out = _with_scaled_rows(lambda rows: kernel.run(rows, weight, None), x)
        return out if bias is None else out + bias
    return run


# Every live model's Matmul, by handle: the compiled op's integer argument names one (ops take no Python
# objects; the packed oneDNN and FBGEMM weights cannot be traced, so they stay behind the op). Weak, so a
# model let go is freed.
_MATMULS: weakref.WeakValueDictionary[int, Matmul] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()

# Defined with torch.library directly rather than the custom_op decorator, whose Python wrapper costs
# twice as much a call, and a decode step makes four calls per layer.
_LIBRARY = torch.library.Library("ember", "DEF")
_LIBRARY.define("matmul(Tensor x, int handle, int index, bool scaled) -> Tensor")


def _matmul_op(x: torch.Tensor, handle: int, index: int, scaled: bool) -> torch.Tensor:
    return _MATMULS[handle].apply(x, index, None, scaled)


def _matmul_shape(x: torch.Tensor, handle: int, index: int, scaled: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], _MATMULS[handle].out_features(index))


for _key in ("CPU", "CUDA"):
    _LIBRARY.impl("matmul", _matmul_op, _key)
_LIBRARY.impl("matmul", _matmul_shape, "Meta")


def _seconds(kernel, *args, repeats: int = 3) -> float:
    """The best of a few timed calls after a warm-up: what a kernel costs without the noise."""
    x = args[0]
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)  # GPU calls return at launch
    kernel(*args)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        kernel(*args)
        sync()
        best = min(best, time.perf_counter() - start)
    return best
