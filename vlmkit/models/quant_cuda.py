"""The quantized layers off the CPU: torch's own CUDA weight-only kernels, and a dequantizing fallback that runs on
every device.

int4 weights are stored in one of three layouts (`Int4Linear.layout`, chosen by the device they live on):
- "cpu": `_convert_weight_to_int4pack_for_cpu`'s, read by `_weight_int4pack_mm_for_cpu` (models/quant.py);
- "cuda": the tinygemm layout of `_convert_weight_to_int4pack` (int32 [N/8, K/(16 t), 32, t/2], t inner k-tiles),
  read by `_weight_int4pack_mm` (bf16 activations; NVIDIA GPUs from Ampere, sm80, on);
- "plain": two values per byte (`pack_nibbles`, as saved folders store them), dequantized per call: MPS, older or ROCm GPUs, anything else.
The scales and zero points are one [K/g, N, 2] bf16 tensor in every layout: all kernels compute
w = (q - 8) * scale + zero. The tinygemm layout is also written here in plain torch (`pack_tinygemm`,
`unpack_tinygemm`): the unpacking is how a model on the GPU is saved, trained through (QLoRA's backward) or moved
to another device; tests check both against a line-by-line transcription of torch's CUDA packing kernel, and
`python -m bench.gpu` against the real op and kernel.

int8 weights ([N, K] int8 and a scale per row) have one layout everywhere; on CUDA `_weight_int8pack_mm` (a GEMV:
one warp per output, weights read once per row of x) runs the few-row decode steps, a bf16 GEMM on the weights
dequantized for the call runs the rest.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import quant_kernels

# Rows of x up to which the weight-only kernels beat dequantize + GEMM on a GPU. The int8 kernel reads the weights
# once per row (a GEMV), tinygemm once per 16 rows but on slower tensor-core paths than cuBLAS; `python -m
# bench.gpu` measures both sides at 1, 32 and a prefill's rows on the chip it runs on.
INT8_KERNEL_ROWS = 4
INT4_KERNEL_ROWS = 64
INNER_K_TILES = (8, 4, 2)  # widest first: 16-byte loads where K allows
GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm takes
LAYOUTS = ("cpu", "cuda", "plain")


@functools.lru_cache(maxsize=None)  # asked on every call of a layer
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether this torch build registers aten::`op` for `dispatch_key` ("CUDA", "MPS", ...)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", dispatch_key))
    except RuntimeError:  # an op this torch does not have at all
        return False


def use_kernel(op: str, device: torch.device, rows: int) -> bool:
    """Whether `rows` rows of x on `device` go through torch's CUDA kernel `op` (else: dequantize + GEMM)."""
    limit = INT4_KERNEL_ROWS if op == "_weight_int4pack_mm" else INT8_KERNEL_ROWS
    return device.type == "cuda" and rows <= limit and has_kernel(op, "CUDA")


def cuda_int4_kernel(device: torch.device) -> bool:
    """tinygemm runs here: an NVIDIA GPU (not ROCm: its packing differs) of compute capability 8.0 or newer."""
    return (device.type == "cuda" and torch.version.hip is None and torch.cuda.is_available()
            and has_kernel("_weight_int4pack_mm", "CUDA") and torch.cuda.get_device_capability(device) >= (8, 0))


def int4_layout(device, n: int, k: int, group_size: int) -> str:
    """The layout an [n, k] int4 weight with groups of `group_size` takes on `device`."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    fits = group_size in GROUP_SIZES and k % group_size == 0 and n % 8 == 0  # the CUDA kernel's limits
    return "cuda" if fits and cuda_int4_kernel(device) else "plain"


def inner_k_tiles(k: int) -> int:
    for t in INNER_K_TILES:
        if k % (t * 16) == 0:
            return t
    raise ValueError(f"int4 on CUDA needs the input width to be a multiple of 32, got {k}")


# ------------------------------------------------------------------------------------------------ tinygemm layout
# torch's matrix_to_m16n8k16_Bint4_layout (aten/src/ATen/native/cuda/int4mm.cu), in tensor operations: lane t of
# n-tile nt, k-super-tile ko holds row n = 8 nt + t // 4; its int32 number j covers k-tiles 2j, 2j + 1 of the
# super-tile, bytes b_i = 4 i + t % 4 (i = 0..3) of that 32-value stretch. The kernel's input is uint8 [N, K/2]
# with the EVEN column in the high nibble (`kernel_bytes`); the int32 holds the high nibbles of b_0..b_3 in bits
# 0-15 and the low ones in bits 16-31, 4 bits each in order of i.

def kernel_bytes(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> uint8 [N, K/2] as `_convert_weight_to_int4pack` takes them: column 2j in the HIGH
    nibble (the opposite of quant.pack_nibbles' order)."""
    q = q.to(torch.uint8)
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def pack_tinygemm(q: torch.Tensor, inner_tiles: int) -> torch.Tensor:
    """[N, K] values 0..15 -> int32 [ceil(N/8), K/(16 t), 32, t/2]: what `_convert_weight_to_int4pack(
    kernel_bytes(q), t)` returns, computed with tensor operations on any device."""
    n, k = q.shape
    nt, j, ko = -(-n // 8), inner_tiles // 2, k // (inner_tiles * 16)
    full = torch.zeros(nt * 8, k, dtype=torch.int64, device=q.device)
    full[:n] = q
    v = full.view(nt, 8, ko, j, 4, 4, 2).permute(0, 2, 1, 5, 3, 6, 4)  # [nt, ko, row, t % 4, j, low?, i]
    shifts = (torch.arange(8, device=q.device) * 4).view(2, 4)
    p = (v << shifts).sum((-2, -1))  # disjoint bits: the sum is the OR
    p = torch.where(p >= 2**31, p - 2**32, p).to(torch.int32)  # the same 32 bits, signed
    return p.reshape(nt, ko, 32, j).contiguous()


def unpack_tinygemm(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of pack_tinygemm: uint8 [n, k] values 0..15, on the packed tensor's device."""
    nt, ko, lanes, j = packed.shape
    if lanes != 32 or packed.dtype != torch.int32 or ko * j * 32 != k or nt * 8 < n:
        raise ValueError(f"not a tinygemm int4 layout of a [{n}, {k}] weight: {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * 4
    nib = (packed.view(nt, ko, 8, 4, j, 1) >> shifts) & 15  # [nt, ko, row, t % 4, j, 8 nibbles]
    q = nib.view(nt, ko, 8, 4, j, 2, 4).permute(0, 2, 1, 4, 6, 3, 5)  # [nt, row, ko, j, i, t % 4, low?]
    return q.reshape(nt * 8, k)[:n].to(torch.uint8)


# ------------------------------------------------------------------------------------------------ int4

def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> uint8 [N, K/2]: column 2j in the low nibble, 2j + 1 in the high one (the "plain" layout,
    and how saved folders store int4)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


def pack_int4(q: torch.Tensor, layout: str) -> torch.Tensor:
    """[N, K] values 0..15 (on the target device) -> the packed tensor of a non-CPU `layout`."""
    if layout == "plain":
        return pack_nibbles(q)
    if layout != "cuda":
        raise ValueError(f"unknown int4 layout {layout!r}; one of {LAYOUTS}")
    t = inner_k_tiles(q.shape[1])
    if q.device.type == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(kernel_bytes(q), t)
    return pack_tinygemm(q, t)  # the same numbers where the op is absent (tests on a CPU-only torch)


def int4_values(packed: torch.Tensor, layout: str, n: int, k: int) -> torch.Tensor:
    """uint8 [n, k] values 0..15 of a non-CPU layout, on the packed tensor's device."""
    if layout == "plain":
        return unpack_nibbles(packed)
    if layout == "cuda":
        return unpack_tinygemm(packed, n, k)
    raise ValueError(f"int4_values reads the non-CPU layouts {LAYOUTS[1:]}, got {layout!r}")


def int4_dequantize(values: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, dtype) -> torch.Tensor:
    """[N, K] weights in `dtype` from the values and the kernels' [K/g, N, 2] (scale, zero): (q - 8) * s + z."""
    n, k = values.shape
    sz = scales_and_zeros.to(dtype)
    scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # [N, K/g, 1]
    w = (values.view(n, k // group_size, group_size).to(dtype) - 8) * scale + zero
    return w.reshape(n, k)


def int4_mm(x2: torch.Tensor, packed, layout: str, scales_and_zeros, group_size: int, n: int, k: int):
    """x2 [M, K] @ W.T for a non-CPU layout: tinygemm for few rows on a CUDA GPU, else a GEMM in x2's dtype on the
    weights dequantized for this call."""
    if layout == "cuda" and use_kernel("_weight_int4pack_mm", x2.device, x2.shape[0]):
        return torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), packed, group_size,
                                                  scales_and_zeros)
    w = int4_dequantize(int4_values(packed, layout, n, k), scales_and_zeros, group_size, x2.dtype)
    return F.linear(x2, w)


# ------------------------------------------------------------------------------------------------ int8

def int8_mm(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ (q * scale).T off the CPU: torch's CUDA int8 kernel for few rows, else a GEMM on the int8 values
    in x2's dtype (exact: |q| <= 127 fits bf16's 8 bits) with the scales applied to its output."""
    if use_kernel("_weight_int8pack_mm", x2.device, x2.shape[0]):
        return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), qweight, scales)
    return F.linear(x2, qweight.to(x2.dtype)) * scales.to(x2.dtype)


# ------------------------------------------------------------------------------------------------ Int4Linear

def pack_for(module, q: torch.Tensor) -> torch.Tensor:
    """The packed form of an Int4Linear's values `q` for the device they are on; sets `module.layout`."""
    module.layout = int4_layout(q.device, module.out_features, module.in_features, module.group_size)
    if module.layout == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    return pack_int4(q, module.layout)


def target_device(fn, current: torch.device) -> torch.device:
    """Where Module._apply's `fn` sends an integer buffer (.to(device) / .cuda() / .cpu() move it; .half() does not)."""
    return fn(torch.empty(0, dtype=torch.uint8, device=current)).device


def move_int4(module, fn, apply, recurse: bool):
    """Int4Linear._apply: `apply` (nn.Module._apply) as usual, but across layouts the 4-bit values are read out on
    the old device and packed again on the new one."""
    target = target_device(fn, module.packed.device)
    if int4_layout(target, module.out_features, module.in_features, module.group_size) == module.layout:
        return apply(fn, recurse)
    q = int4_values(module.packed, module.layout, module.out_features, module.in_features) \
        if module.layout != "cpu" else quant_kernels.int4_values(module.packed, module.out_features,
                                                                  module.in_features)
    q = module.values() if q is None else q  # None: a CPU layout the fast reader does not know
    module.packed = module.packed.new_empty(0)  # not moved: replaced below
    apply(fn, recurse)
    module.packed = pack_for(module, fn(q))
    for cached in ("_nibbles", "_scales", "_mins"):  # quant._backward_weight's copies, on the old device
        module.__dict__.pop(cached, None)
    return module
