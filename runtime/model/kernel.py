"""What a matmul kernel is to `Matmul`: how it prepares a weight, how it runs, what input it expects."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Kernel(NamedTuple):
    prepare: Callable | None  # makes the weight's copy this kernel reads, once at load (None: the weight as it is)
    run: Callable  # (x, prepared weight, bias) → x @ weight.T + bias, in x's dtype
    # Expects each row of x divided by its largest magnitude, in fp32 (the caller multiplies the output rows
    # back): kernels that quantize their whole input with one scale, so one row's outlier costs no other row.
    scaled_rows: bool = False
