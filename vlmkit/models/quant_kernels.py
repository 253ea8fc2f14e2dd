"""Prefill paths of the quantized layers: many rows at once through a GEMM instead of torch's weight-only kernels,
which are GEMV-shaped and run a 600-row prefill 2-4x slower than a float GEMM (bench/quant_kernels.md). Decode (few
rows) keeps the packed kernels: they read 4-8x fewer bytes per token.

Two GEMMs: a float GEMM on the layer dequantized in slices (exact on the stored weights), and an int8 x int8 GEMM
(fbgemm's `quantized.linear_dynamic`: activations quantized per call, 7-bit on CPUs without VNNI) on a weight packed
once (quant_packed.py): 1.6-1.8x an fp32 GEMM's speed at 600 rows even on AVX2, but packing costs as much as the
GEMM itself, so packing per call loses to the float GEMM (bench/quant_kernels.md) and only a layer that holds the
packed weight instead of its plain int8 copy uses it. Activations are scaled to unit max per row before the int8
GEMM (and the rows scaled back after), so the op's per-tensor scale acts as a per-row one: image and text rows of
one prompt differ in range.

The int4 packed layout of `_convert_weight_to_int4pack_for_cpu` is undocumented; it is read here by a layout
probed once on tiny tensors (blocks of `bn` rows stored [K, bn/2] with row j in the low nibble and row j + bn/2 in
the high one; a tail block of fewer rows pairs rows 2j, 2j + 1). If the probe does not recognise it (another torch,
another CPU), `None` is returned and callers keep the kernel path.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..hardware import cpu_flags

# Rows from which a float GEMM on the dequantized layer beats the packed kernels (bench/quant_kernels.md: on this
# AVX2 box the bf16 kernels still win at 128 rows and lose by 1.4-1.8x at 600; the crossover is near 300).
PREFILL_ROWS = 256

_LAYOUT: dict = {}


def _values_t(packed: torch.Tensor, n: int, k: int, bn: int) -> torch.Tensor:
    """The 4-bit values of a packed [n, k] weight, TRANSPOSED: uint8 [k, n]. Transposed because the packed blocks
    are stored [K, rows]: writing them that way moves runs of bn/2 values instead of transposing element by element
    (measured 5x faster)."""
    flat, full = packed.reshape(-1), n // bn * bn
    q = torch.empty(k, n, dtype=torch.uint8, device=packed.device)
    if full:
        b = flat[: full * k // 2].reshape(full // bn, k, bn // 2).transpose(0, 1)  # [k, blocks, bn/2]
        torch.stack([b & 15, b >> 4], 2, out=q[:, :full].view(k, full // bn, 2, bn // 2))
    if n > full:
        b = flat[full * k // 2:].reshape(k, (n - full) // 2)
        q[:, full:] = torch.stack([b & 15, b >> 4], -1).reshape(k, n - full)
    return q


def _block_rows() -> Optional[int]:
    """The packer's row block (None: a layout this module does not know), probed once on random values."""
    if "bn" not in _LAYOUT:
        _LAYOUT["bn"] = None
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (80, 64), dtype=torch.int32, generator=g)  # 80: full blocks and a tail
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        for bn in (64, 32, 16):
            if p.numel() == q.numel() // 2 and torch.equal(_values_t(p, 80, 64, bn).t().int(), q):
                _LAYOUT["bn"] = bn
                break
    return _LAYOUT["bn"]


def int4_values(packed: torch.Tensor, n: int, k: int) -> Optional[torch.Tensor]:
    """uint8 [n, k] 4-bit values of a packed int4 weight, or None when the layout is unknown."""
    bn = _block_rows()
    return None if bn is None else _values_t(packed, n, k, bn).t()


def int4_dequantize_t(packed, scales_and_zeros, group_size: int, n: int, k: int, dtype) -> Optional[torch.Tensor]:
    """The TRANSPOSED weights [k, n] in `dtype` (w = (q - 8) * scale + zero per group, as the kernel computes them),
    or None when the layout is unknown."""
    bn = _block_rows()
    if bn is None:
        return None
    q = _values_t(packed, n, k, bn)
    sz = scales_and_zeros.to(dtype)  # [k/g, n, 2]
    scale, zero = sz[..., 0], sz[..., 1] - 8 * sz[..., 0]  # (q - 8) * s + z = q * s + (z - 8 s)
    wt = q.to(dtype)
    groups = wt.view(k // group_size, group_size, n)
    torch.addcmul(zero[:, None], groups, scale[:, None], out=groups)  # one pass over the temporary
    return wt


def int8_dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    return qweight.to(dtype).mul_(scales.to(dtype)[:, None])


def prefill_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM's dtype: the activations' own when float32 or bfloat16 (bf16 only where the caller chose it, i.e.
    where the CPU has bf16 units), float32 otherwise."""
    return x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32


def prefill_rows(x: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """x as contiguous [M, k] rows in prefill_dtype when M >= PREFILL_ROWS on the CPU, else None (the kernels)."""
    if x.device.type != "cpu" or x.numel() < PREFILL_ROWS * k:
        return None
    x2 = x.reshape(-1, k)
    dtype = prefill_dtype(x2)
    return (x2 if x2.dtype == dtype else x2.to(dtype)).contiguous()


# A layer's dequantized temporary is bounded to this many floats (64 MB in fp32): bigger layers (an output head,
# 7B MLPs) go through it in slices of output rows, so prefill never holds a float copy of a large matrix.
TEMP_ELEMS = 16 * 2**20


def _slices(n: int, k: int, align: int):
    step = max(align, TEMP_ELEMS // max(k, 1) // align * align)
    return [(r, min(r + step, n)) for r in range(0, n, step)]


def _cat(parts: list) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def int8_prefill(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] (float32 or bfloat16) @ dequantized int8 weights.T, in x2's dtype."""
    n, k = qweight.shape
    return _cat([torch.nn.functional.linear(x2, int8_dequantize(qweight[a:b], scales[a:b], x2.dtype))
                 for a, b in _slices(n, k, 1)])


def int4_prefill(x2, packed, scales_and_zeros, group_size: int, n: int, k: int) -> Optional[torch.Tensor]:
    """As int8_prefill for a packed int4 weight; None when its layout is unknown (the caller keeps the kernel).
    Slices are whole row blocks of the packed layout (rows a..b of `packed` hold exactly weight rows a..b)."""
    bn = _block_rows()
    if bn is None:
        return None
    return _cat([x2 @ int4_dequantize_t(packed[a:b], scales_and_zeros[:, a:b], group_size, b - a, k, x2.dtype)
                 for a, b in _slices(n, k, bn)])


# ------------------------------------------------------------------------------------------------ int8 GEMM

_ENGINE: dict = {}


def _engine() -> Optional[str]:
    """The quantized engine whose packed linear runs the int8 GEMM (fbgemm; "x86" picks it too), None if absent."""
    if "name" not in _ENGINE:
        have = torch.backends.quantized.supported_engines
        _ENGINE["name"] = next((e for e in ("fbgemm", "x86") if e in have), None)
        if _ENGINE["name"] is not None and not hasattr(torch.ops.quantized, "linear_dynamic"):
            _ENGINE["name"] = None
    return _ENGINE["name"]


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor):
    """fbgemm's packed form of int8 [N, K] weights with a float scale per row (about the int8 weights' size), or
    None when torch has no such backend or it refuses (the caller keeps the plain int8 layer)."""
    engine = _engine()
    if engine is None:
        return None
    n = qweight.shape[0]
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():  # quantized tensor types are deprecated, the packed ops still take them
            warnings.simplefilter("ignore")
            wq = torch._make_per_channel_quantized_tensor(qweight, scales.double(),
                                                          torch.zeros(n, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(wq, None)
    except (RuntimeError, NotImplementedError):
        return None
    finally:
        torch.backends.quantized.engine = previous


def reduce_range() -> bool:
    """7-bit activations unless the CPU has VNNI / AMX: without them the u8 x s8 products are summed in pairs into
    saturating 16-bit lanes (vpmaddubsw), which 8-bit activations can overflow."""
    if "reduce" not in _ENGINE:
        _ENGINE["reduce"] = not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags()))
    return _ENGINE["reduce"]


def int8_gemm(x2: torch.Tensor, packed) -> torch.Tensor:
    """float [M, K] @ packed int8 weights.T -> float32 [M, N], activations quantized per row (scaled to unit max
    per row, then the op's per-tensor quantization; an all-zero row stays zero)."""
    x2 = x2.float()
    amax = x2.abs().amax(1, keepdim=True).clamp_(min=1e-30)
    y = torch.ops.quantized.linear_dynamic(x2 / amax, packed, reduce_range())
    return y.mul_(amax)


def unpack_int8(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], float32 scales [N]) back from pack_int8's form."""
    wq, _ = torch.ops.quantized.linear_unpack(packed)
    return wq.int_repr(), wq.q_per_channel_scales().float()
