"""Weight-only quantization on torch's packed CPU kernels (CUDA's and a fallback for other devices: quant_cuda).

- int8: one scale per output channel, `torch.ops.aten._weight_int8pack_mm`.
- int4: groups of `group_size` input channels, asymmetric (w = q * scale + min, q in 0..15; scale and zero point
  in bf16, the kernels' dtype, so a saved model reloads bit for bit), `_weight_int4pack_mm_for_cpu` on the layout of
  `_convert_weight_to_int4pack_for_cpu`. That is GGUF Q4_1's formula with group 32, so Q4_1 tensors become int4
  modules directly, without a float detour (`from_q4_1`: the file's 4-bit values, its block scales in bf16).
- The token table (and the tied output head) is int8 per row in both modes: the head decides every greedy token,
  and llama.cpp keeps it at 8 bits too (SmolLM2's GGUF: Q8_0).

What gets quantized: the decoder's projections (and cross-attention blocks), the token table and head; the vision
tower and connector with `vision=True`. Norms, the patch convolution and position tables stay float.
No file I/O here: checkpoints/builder.py quantizes layer by layer as a checkpoint's weights arrive, and
checkpoints/quantized.py saves and reads quantized folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import quant_cuda, quant_kernels, quant_layout
from .quant_cuda import pack_nibbles, unpack_nibbles
from .quant_layout import memory_layout

MODES = ("int8", "int4")
DEFAULT_GROUP = 32


def check_mode(mode) -> Optional[str]:
    if mode is None or mode in MODES:
        return mode
    raise ValueError(f"quantize must be one of {MODES} (or None), got {mode!r}")


# The packed CPU kernels are fast with bfloat16 activations only: measured on this project's 2-core AVX-512 box
# (M=1, 576x1536): bf16 52 us, float32 2,400 us (int4) / 1,300 us (int8), float16 as slow. So quantized layers take
# float32 in, run the kernel in bf16 with bf16 scales, and hand float32 back; the residual stream stays float32.
KERNEL_DTYPE = getattr(torch, quant_layout.KERNEL_DTYPE)
REFINE = 16  # output heads: candidates whose logits are recomputed in float32 (see Int8Linear.project)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.dtype == KERNEL_DTYPE else x2.to(KERNEL_DTYPE)
    return x2 if x2.is_contiguous() else x2.contiguous()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 64-byte aligned: tensors read from a safetensors file sit at any offset of the mapping, and
    the int8 kernel crashes (SIGSEGV, seen) on a misaligned weight."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


class _Quantized(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        # Empty, but with the model's dtype and device (registered first: the first float buffer): code that reads
        # `module.weight.dtype / .device` keeps working; the weights themselves are in the buffers below.
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)

    def _out(self, y: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        y = y.to(x.dtype) if y.dtype != x.dtype else y
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------------ int8

# Quantizing works on row blocks of about this many elements: the float32 temporaries of a whole token table or
# head (~0.5 GB each at 32k x 4k) would set the load's peak; blocks keep them at ~4 MB each.
CHUNK_ELEMENTS = 1 << 20


def _row_blocks(n: int, k: int):
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    return ((i, min(i + step, n)) for i in range(0, n, step))


def _block(w: torch.Tensor, i: int, j: int, cast) -> torch.Tensor:
    """Rows i:j as float32, rounded through `cast` first (the load's dtype) when given."""
    b = w[i:j]
    return (b.to(cast) if cast is not None and b.dtype != cast else b).float()


def quantize_int8(w: torch.Tensor, cast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], scales [N]), symmetric per row; scales bf16-exact (the kernel's dtype).
    Row blocks at a time (no float32 copy of `w`); cast: a dtype each block is rounded to first."""
    n, k = w.shape
    q, scales = torch.empty(n, k, dtype=torch.int8, device=w.device), torch.empty(n, device=w.device)
    for i, j in _row_blocks(n, k):
        b = _block(w, i, j, cast)
        s = (b.abs().amax(1).clamp(min=1e-12) / 127).to(KERNEL_DTYPE).float()
        q[i:j], scales[i:j] = torch.round(b / s[:, None]).clamp(-127, 127), s
    return q, scales


class Int8Linear(_Quantized):
    """y = (x @ q.T) * scale (+ bias). On CPU the packed kernel; elsewhere quant_cuda's."""

    kind = "int8"
    parts = ("qweight", "scales")  # what export() returns: the tensors a saved folder holds

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias=None, dtype=torch.float32):
        super().__init__(dtype)
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", _aligned(qweight))
        self.register_buffer("scales", scales.to(KERNEL_DTYPE).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @classmethod
    def from_float(cls, weight, bias=None, dtype=None) -> "Int8Linear":
        return cls(*quantize_int8(weight), bias, dtype or weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            y = quant_cuda.int8_mm(x.reshape(-1, self.in_features), self.qweight, self.scales)
            return self._out(y, x, self.out_features)
        if (x2 := quant_kernels.prefill_rows(x, self.in_features)) is not None:
            return self._out(quant_kernels.int8_prefill(x2, self.qweight, self.scales), x, self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(_rows(x, self.in_features), self.qweight, self.scales)
        return self._out(y, x, self.out_features)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """As an output head: the kernel's logits are bf16-rounded (0.125 apart near 25: greedy near-ties flip), so
        the `REFINE` best rows are recomputed exactly in float32 (int8 weights, float32 activations)."""
        y = Int8Linear.forward(self, h) if self.bias is None else Int8Linear.forward(self, h) - self.bias
        flat, hf = y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]).float()
        idx = flat.topk(min(REFINE, flat.shape[-1]), dim=-1).indices  # [rows, k]
        rows = self.qweight[idx].float() * self.scales[idx].float()[..., None]  # [rows, k, K]
        exact = torch.bmm(rows, hf[:, :, None])[..., 0].to(flat.dtype)
        y = flat.scatter(-1, idx, exact).reshape(y.shape)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def export(self) -> dict:
        return {"qweight": self.qweight, "scales": self.scales.float()}

    @classmethod
    def from_export(cls, t: dict, bias=None, dtype=torch.float32, group_size=None) -> "Int8Linear":
        return cls(t["qweight"], t["scales"], bias, dtype)

    @classmethod
    def empty(cls, n: int, k: int, bias=None, dtype=torch.float32, group_size=None, device="meta"):
        """An [n, k] module of this kind without data (on the meta device: shapes and bytes only)."""
        parts = {name: torch.empty(shape, dtype=getattr(torch, kind), device=device)
                 for name, (shape, kind) in memory_layout(cls.kind, n, k, group_size).items()}
        return cls.from_export(parts, bias, dtype, group_size)


class Int8Embedding(Int8Linear):
    """Token table as int8 rows + a scale per row; `project(h)` is the tied output head on the same table."""

    kind = "embed8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32):
        super().__init__(qweight, scales, None, dtype)
        self.num_embeddings, self.embedding_dim = qweight.shape

    @classmethod
    def from_float(cls, weight, dtype=None) -> "Int8Embedding":
        return cls(*quantize_int8(weight), dtype or weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        return self.qweight[ids].to(dtype) * self.scales[ids].to(dtype).unsqueeze(-1)

    @classmethod
    def from_export(cls, t: dict, bias=None, dtype=torch.float32, group_size=None) -> "Int8Embedding":
        return cls(t["qweight"], t["scales"], dtype)


# ------------------------------------------------------------------------------------------------ int4

def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP, cast=None):
    """[N, K] float -> (q uint8 [N, K] in 0..15, scales [N, K/g], mins [N, K/g]); w ~ q * scale + min, with scale
    and the kernel's zero (min + 8 scale) bf16-exact, as the module keeps them."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales, mins = (torch.empty(n, k // group_size, device=w.device) for _ in range(2))
    for i, j in _row_blocks(n, k):  # row blocks: no float32 copy of the whole weight
        wg = _block(w, i, j, cast).reshape(j - i, k // group_size, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = ((hi - lo) / 15).clamp(min=2**-20).to(KERNEL_DTYPE).float()
        m = _bf16_mins(lo, s)
        q[i:j] = torch.round((wg - m[..., None]) / s[..., None]).clamp(0, 15).reshape(j - i, k)
        scales[i:j], mins[i:j] = s, m
    return q, scales, mins


def _bf16_mins(mins: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The min the kernel will really use: its zero point (min + 8 scale) is rounded to bf16."""
    return (mins + 8 * scales).to(KERNEL_DTYPE).float() - 8 * scales


def int4_supported(n: int, k: int, group_size: int) -> bool:
    return k % group_size == 0 and group_size in (32, 64, 128, 256) and n % 16 == 0  # the packer's limits


class Int4Linear(_Quantized):
    """Group-wise int4 weights packed for the device they live on (`layout`: quant_cuda explains the three). On the
    CPU only the kernel's packed copy is kept: `export` recovers the plain values by running the kernel on an
    identity matrix, so saving needs no knowledge of that layout. Moving the module repacks it for the new device."""

    kind = "int4"
    parts = ("qweight", "scales", "mins")

    def __init__(self, q: torch.Tensor, scales, mins, group_size: int, bias=None, dtype=torch.float32):
        super().__init__(dtype)
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.register_buffer("packed", quant_cuda.pack_for(self, q))
        # the kernel's form: [K/g, N, 2] = (scale, zero) with w = (q - 8) * scale + zero
        sz = torch.stack([scales.float().t(), (mins.float() + 8 * scales.float()).t()], dim=-1)
        self.register_buffer("scales_and_zeros", sz.to(KERNEL_DTYPE).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @classmethod
    def from_float(cls, weight, bias=None, dtype=None, group_size: int = DEFAULT_GROUP) -> "Int4Linear":
        return cls(*quantize_int4(weight, group_size), group_size, bias, dtype or weight.dtype)

    def _apply(self, fn, recurse=True):
        """.to(device) / .cuda() / .cpu(): the packed layout belongs to a device, so a move repacks the module."""
        return quant_cuda.move_int4(self, fn, super()._apply, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout != "cpu":
            y = quant_cuda.int4_mm(x.reshape(-1, self.in_features), self.packed, self.layout, self.scales_and_zeros,
                                   self.group_size, self.out_features, self.in_features)
            return self._out(y, x, self.out_features)
        if (x2 := quant_kernels.prefill_rows(x, self.in_features)) is not None:
            y = quant_kernels.int4_prefill(x2, self.packed, self.scales_and_zeros, self.group_size,
                                           self.out_features, self.in_features)
            if y is not None:  # None: a packed layout this torch has changed (the kernel still reads it)
                return self._out(y, x, self.out_features)
        sz = self.scales_and_zeros  # strided where models/fused.py stacked it: the kernel reads it as contiguous
        sz = sz if sz.is_contiguous() else sz.contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_rows(x, self.in_features), self.packed, self.group_size, sz)
        return self._out(y, x, self.out_features)

    project = forward

    def values(self) -> torch.Tensor:
        """The 4-bit values [N, K] (uint8), read through the kernel itself with scale 1 and zero 8 on an identity
        matrix: every number involved is a small integer, exact in bf16."""
        if self.layout != "cpu":
            return quant_cuda.int4_values(self.packed, self.layout, self.out_features, self.in_features)
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE, device=self.packed.device)
        unit = torch.empty_like(self.scales_and_zeros)
        unit[..., 0], unit[..., 1] = 1, 8
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, unit)
        return q.t().round().to(torch.uint8).contiguous()

    def _scales_mins(self):
        sz = self.scales_and_zeros.float()
        scales = sz[..., 0].t().contiguous()
        return scales, (sz[..., 1].t() - 8 * scales).contiguous()

    def dequantize(self) -> torch.Tensor:
        scales, mins = self._scales_mins()
        q = self.values().float().reshape(self.out_features, -1, self.group_size)
        return (q * scales[..., None] + mins[..., None]).reshape(self.out_features, self.in_features)

    def export(self) -> dict:
        scales, mins = self._scales_mins()
        return {"qweight": pack_nibbles(self.values()), "scales": scales, "mins": mins}

    @classmethod
    def from_export(cls, t: dict, bias=None, dtype=torch.float32, group_size=DEFAULT_GROUP) -> "Int4Linear":
        return cls(unpack_nibbles(t["qweight"]), t["scales"], t["mins"], group_size, bias, dtype)

    @classmethod
    def empty(cls, n: int, k: int, bias=None, dtype=torch.float32, group_size=DEFAULT_GROUP, device="meta"):
        """An [n, k] module without data, its buffers shaped as on the CPU (4 bits a weight in every layout): built
        directly, since packing runs ops whose meta versions are slow (see models/meta.py)."""
        module = cls.__new__(cls)
        _Quantized.__init__(module, dtype)
        module.out_features, module.in_features, module.group_size, module.layout = n, k, group_size, "cpu"
        for name, (shape, kind) in memory_layout(cls.kind, n, k, group_size).items():
            module.register_buffer(name, torch.empty(shape, dtype=getattr(torch, kind), device=device))
        module.bias = None if bias is None else nn.Parameter(torch.empty_like(bias, dtype=dtype), requires_grad=False)
        return module


def from_q4_1(raw: np.ndarray, rows: int, cols: int, dtype=torch.float32, row_order=None) -> Int4Linear:
    """A GGUF Q4_1 tensor (uint8 [rows, cols / 32 * 20]: per block of 32 a float16 scale d, a float16 min m and
    16 bytes holding elements i (low nibble) and i + 16 (high)) as an Int4Linear with group 32: the same
    weights, w = q * d + m. row_order: a permutation of the rows (llama.cpp's q/k RoPE order -> ours)."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // 32, 20)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    qs = torch.from_numpy(blocks[..., 4:].copy())
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(rows, cols)
    if row_order is not None:
        q, d, m = q[row_order], d[row_order], m[row_order]
    d = d.to(KERNEL_DTYPE).float()  # the kernel's bf16 block scales (the 4-bit values stay exactly the file's)
    return Int4Linear(q, d, _bf16_mins(m, d), 32, None, dtype)


# ------------------------------------------------------------------------------------------------ model

QUANT_MODULES = (Int8Linear, Int4Linear, Int8Embedding)
BUILDERS = {"int8": Int8Linear, "int4": Int4Linear, "embed8": Int8Embedding}


def target_kinds(model: nn.Module, mode: str, vision: bool = False, group_size: int = DEFAULT_GROUP) -> dict:
    """module name -> "int8" | "int4" | "embed8" for every module `mode` quantizes. int4 falls back to int8 where
    the kernel cannot take the shape (input width not a multiple of the group, odd row counts)."""
    check_mode(mode)
    kinds = {}
    for name, module in model.named_modules():
        local = name[len("text."):] if name.startswith("text.") else name
        if isinstance(module, nn.Embedding) and local == "embed_tokens":
            kinds[name] = "embed8"
        elif isinstance(module, nn.Linear) and local == "lm_head":
            kinds[name] = "int8"
        elif isinstance(module, nn.Linear) and (
            local.startswith(("layers.", "cross_blocks.")) and not name.startswith(("vision.", "connector."))
            or vision and name.startswith(("vision.", "connector."))
        ):
            n, k = module.weight.shape
            kinds[name] = "int4" if mode == "int4" and int4_supported(n, k, group_size) else "int8"
    return kinds


def make_module(kind: str, weight: torch.Tensor, bias=None, dtype=None, group_size: int = DEFAULT_GROUP):
    """The `kind` module of `weight`, quantized by row blocks; dtype: the model's float dtype (the weight is
    rounded to it first, as if cast whole, without the whole cast copy)."""
    cast = dtype if dtype is not None and weight.is_floating_point() else None
    dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    if kind == "embed8":
        return Int8Embedding(*quantize_int8(weight, cast), dtype)
    if kind == "int4":
        return Int4Linear(*quantize_int4(weight, group_size, cast), group_size, bias, dtype)
    return Int8Linear(*quantize_int8(weight, cast), bias, dtype)


@dataclass
class QuantSpec:
    """What a model load quantizes: the mode, the group size and which module becomes which kind."""

    mode: str
    group_size: int = DEFAULT_GROUP
    vision: bool = False
    modules: Optional[dict] = None  # name -> kind as a saved folder states it; None: target_kinds of the model
    int8: frozenset = frozenset()  # modules kept at 8 bits where the mode would give them 4

    def kinds(self, model: nn.Module) -> dict:
        if self.modules is not None:
            return dict(self.modules)
        kinds = target_kinds(model, check_mode(self.mode), self.vision, self.group_size)
        kinds.update({name: "int8" for name in self.int8 if kinds.get(name) == "int4"})
        return kinds


def int8_embedding_by_rows(read_rows, rows: int, cols: int, num_embeddings: int, dtype=torch.float32,
                           chunk: int = 4096) -> Int8Embedding:
    """An int8 token table quantized `chunk` rows at a time from `read_rows(start, stop)` (float rows), never the
    float table at once; rows past `rows` (tokens added after the checkpoint) stay zero."""
    q = torch.zeros(max(rows, num_embeddings), cols, dtype=torch.int8)
    scales = torch.full((q.shape[0],), 1e-12)
    for i in range(0, rows, chunk):
        q[i : i + chunk], scales[i : i + chunk] = quantize_int8(read_rows(i, min(i + chunk, rows)))
    return Int8Embedding(q, scales, dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, vision: bool = False, group_size: int = DEFAULT_GROUP) -> nn.Module:
    """Replace the target modules of a float model in place (module by module, so the float copy of each goes
    away as its quantized one arrives). Returns the model, with `model.quantization` describing what was done."""
    kinds = target_kinds(model, mode, vision, group_size)
    for name, kind in kinds.items():
        module = model.get_submodule(name)
        bias = getattr(module, "bias", None)
        model.set_submodule(name, make_module(kind, module.weight.data, None if bias is None else bias.data,
                                              group_size=group_size))
    describe(model, mode, group_size, kinds)
    return model


def quantize_as_saved(model: nn.Module, quantization: dict) -> nn.Module:
    """Replace the modules a saved `quantization_config` names by quantized ones of the same shapes, in the model's
    dtype, without data (`empty`): on a meta-device model, how `vlmkit.describe` sizes a saved folder from its config
    alone."""
    dtype, group_size = next(model.parameters()).dtype, quantization["group_size"]
    for name, kind in quantization["modules"].items():
        module = model.get_submodule(name)
        n, k = module.weight.shape
        model.set_submodule(name, BUILDERS[kind].empty(n, k, getattr(module, "bias", None), dtype, group_size))
    describe(model, quantization["mode"], quantization["group_size"], quantization["modules"])
    return model


def describe(model: nn.Module, mode: str, group_size: int, kinds: dict) -> None:
    model.quantization = {"quant_method": "vlmkit", "mode": mode, "group_size": group_size, "modules": dict(kinds)}


def quantization_of(model: nn.Module) -> Optional[dict]:
    return getattr(model, "quantization", None)


def memory_bytes(model: nn.Module) -> int:
    """Bytes of the weights: parameters, and the buffers of quantized modules (where their weights live)."""
    tensors = {id(t): t for t in model.parameters()}
    tensors.update((id(t), t) for m in model.modules() if isinstance(m, QUANT_MODULES) for t in m.buffers())
    packed = sum(m.nbytes() for m in model.modules() if hasattr(m, "packed") and hasattr(m, "nbytes"))  # fbgemm's
    return sum(t.numel() * t.element_size() for t in tensors.values()) + packed


# ------------------------------------------------------------------------------------------------ training
# The packed CPU kernels have no backward. LoRA over a frozen quantized base needs the gradient to the layer's input
# (every adapter below the layer does), so it is computed here: dx = dy @ W with W dequantized for that backward
# only; the quantized weights themselves never get a gradient.

def is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "dequantize") and hasattr(module, "export")


class _FrozenQuantizedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, fn):
        ctx.module = module
        with torch.no_grad():
            return fn(module, x)

    @staticmethod
    def backward(ctx, dy):
        w = _backward_weight(ctx.module).to(dy.dtype)
        return dy @ w, None, None


def _backward_weight(module: nn.Module) -> torch.Tensor:
    """The dequantized [out, in] weight. int8 dequantizes elementwise; int4's packed layout is only readable through
    its kernel, so its plain 4-bit values (half a byte per weight) are kept after the first backward."""
    if not hasattr(module, "group_size"):
        return module.dequantize()
    if not hasattr(module, "_nibbles"):
        q = module.export()  # qweight: the 4-bit values already packed two per byte
        module._nibbles, module._scales, module._mins = q["qweight"], q["scales"], q["mins"]
    q = unpack_nibbles(module._nibbles).float().reshape(module.out_features, -1, module.group_size)
    return (q * module._scales[..., None] + module._mins[..., None]).reshape(module.out_features, -1)


def train_through_quantized(module: nn.Module) -> None:
    """Let gradients flow to the input of a quantized layer (per instance: forward and its `project` alias)."""
    if getattr(module, "_grad_through", False):
        return
    cls = type(module)
    if not hasattr(module, "num_embeddings"):  # an embedding table's forward is a lookup: only its head projects
        module.forward = lambda x, _m=module: _FrozenQuantizedMatmul.apply(x, _m, cls.forward)
    if hasattr(cls, "project"):
        module.project = lambda h, _m=module: _FrozenQuantizedMatmul.apply(h, _m, cls.project)
    module._grad_through = True
