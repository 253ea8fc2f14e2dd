"""Decode-time int4 projections: a layer's q/k/v as one packed matrix, gate/up as another, each call on the faster
AVX2 kernel where it runs (models/int4_cpu.py; torch's kernel elsewhere).

A decode step is a handful of GEMVs per layer; one larger kernel call instead of three (two) saves the calls' fixed
costs and reads the shared input once. Fusing is an inference-time view, never a new model: the fused matrix is the
layers' packed rows stacked (the packer stores whole blocks of rows contiguously, quant_kernels probes its block),
and each original layer then holds a view of its own rows. No weight is held twice; checkpoint keys, saving
(`export` reads the layers), LoRA wrapping and training see the original modules unchanged. A fused group is used
only while the decoder still holds exactly the modules it was built from, untouched by training hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import int4_cpu, quant_kernels
from .quant import Int4Linear, _rows


class FusedInt4:
    """Int4Linear layers sharing one input, as one kernel call; `__call__(x)` returns each layer's output."""

    def __init__(self, layers: list):
        self.layers = tuple(layers)
        first = layers[0]
        self.in_features, self.group_size = first.in_features, first.group_size
        self.sizes = [m.out_features for m in layers]
        self.out_features = sum(self.sizes)
        if len(layers) == 1:  # a group of one: the layer's own tensors (the faster kernel, nothing stacked)
            self.packed, self.scales_and_zeros = first.packed, first.scales_and_zeros
            self.pointers = [first.packed.data_ptr()]
            return
        self.packed = torch.cat([m.packed for m in layers])
        self.scales_and_zeros = torch.cat([m.scales_and_zeros for m in layers], 1).contiguous()
        start = 0
        for m, n in zip(layers, self.sizes):  # the layers keep views of their rows: one copy of the weights
            m.packed = self.packed[start : start + n]
            m.scales_and_zeros = self.scales_and_zeros[:, start : start + n]
            start += n
        self.pointers = [m.packed.data_ptr() for m in layers]

    def current(self, layers) -> bool:
        """Whether `layers` are still exactly the fused ones (not replaced, wrapped or set up for training) and still
        hold the weights it reads (`load_state_dict` copies into them; `.to()` would replace them)."""
        return len(layers) == len(self.layers) and all(
            a is b and not getattr(a, "_grad_through", False) and a.packed.data_ptr() == p
            for a, b, p in zip(layers, self.layers, self.pointers))

    def __call__(self, x: torch.Tensor) -> tuple:
        if quant_kernels.prefill_rows(x, self.in_features) is not None:  # many rows: the layers' prefill path
            return tuple(m(x) for m in self.layers)
        x2 = x.reshape(-1, self.in_features)
        y = None
        if not torch.compiler.is_compiling():  # a ctypes call: opaque to torch.compile, which keeps torch's kernel
            y = int4_cpu.gemm(x2, self.packed, self.scales_and_zeros, self.group_size, self.out_features)
        if y is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(_rows(x2, self.in_features), self.packed,
                                                            self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype) if y.dtype != x.dtype else y
        if len(self.sizes) == 1:
            return (y.reshape(*x.shape[:-1], self.out_features),)
        return tuple(p.reshape(*x.shape[:-1], p.shape[-1]) for p in y.split(self.sizes, -1))


def fusable(layers: list) -> bool:
    """Int4Linear layers on the CPU with one input width and group, no bias, and row counts on whole blocks of the
    packed layout (all but the last), so that stacking packed rows is stacking the matrices."""
    if not all(type(m) is Int4Linear and m.bias is None and m.packed.device.type == "cpu"
               and not getattr(m, "_grad_through", False) for m in layers):
        return False
    first = layers[0]
    if any(m.in_features != first.in_features or m.group_size != first.group_size for m in layers):
        return False
    bn = quant_kernels._block_rows()
    return bn is not None and all(m.out_features % bn == 0 for m in layers[:-1])


@dataclass
class LayerProjections:
    qkv: Optional[FusedInt4] = None
    gate_up: Optional[FusedInt4] = None
    o: Optional[FusedInt4] = None
    down: Optional[FusedInt4] = None


def _group(old: Optional[FusedInt4], layers: list) -> Optional[FusedInt4]:
    if old is not None and old.current(layers):
        return old
    return FusedInt4(layers) if fusable(layers) else None


def decode_projections(decoder) -> list:
    """Per decoder layer its int4 groups: q/k/v and gate/up stacked, o and down alone (None where a group cannot
    be formed), built at the first call and rebuilt where a layer's modules have changed since (quantized,
    wrapped, replaced)."""
    cached = decoder.__dict__.get("_fused_projections")  # a plain attribute: no module, buffer or state-dict key
    if torch.compiler.is_compiling():  # compile_decode built them before tracing: traced as built
        return cached if cached is not None else [LayerProjections()] * len(decoder.layers)
    out = []
    for i, layer in enumerate(decoder.layers):
        old = cached[i] if cached is not None and i < len(cached) else LayerProjections()
        a, f = layer.attn, layer.mlp
        out.append(LayerProjections(_group(old.qkv, [a.q_proj, a.k_proj, a.v_proj]),
                                    _group(old.gate_up, [f.gate_proj, f.up_proj]),
                                    _group(old.o, [a.o_proj]), _group(old.down, [f.down_proj])))
    decoder.__dict__["_fused_projections"] = out
    return out
