"""The buffers a quantized layer holds in memory and what a saved folder stores of it, by kind, without torch:
quant.py builds its modules' empty buffers from `memory_layout`, and `vlmkit info`'s torch-free path
(vlmkit.checkpoints.header_info) sizes saved-quantized folders with the same two functions."""

from __future__ import annotations

import math

from ..machine import ITEMSIZE

KERNEL_DTYPE = "bfloat16"  # the packed kernels' scales (quant.KERNEL_DTYPE)


def memory_layout(kind: str, n: int, k: int, group_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """buffer name -> (shape, dtype name) of an [n, k] layer of `kind` as it sits on the CPU (quant.py's kernels:
    int8 one bf16 scale per row; int4 two weights a byte and a bf16 (scale, zero) pair per group of each row)."""
    if kind in ("int8", "embed8"):
        return {"qweight": ((n, k), "int8"), "scales": ((n,), KERNEL_DTYPE)}
    if kind == "int4":
        return {"packed": ((n, k // 2), "uint8"), "scales_and_zeros": ((k // group_size, n, 2), KERNEL_DTYPE)}
    raise ValueError(f"unknown quantized kind {kind!r}")


def memory_bytes(kind: str, n: int, k: int, group_size: int) -> int:
    return sum(math.prod(shape) * ITEMSIZE[dtype] for shape, dtype in memory_layout(kind, n, k, group_size).values())


def saved_weight_shape(kind: str, qweight_shape) -> tuple[int, int]:
    """[n, k] of the layer whose saved `<name>.qweight` has this shape (int4 stores two 4-bit values a byte)."""
    n, cols = qweight_shape
    return (n, 2 * cols) if kind == "int4" else (n, cols)
