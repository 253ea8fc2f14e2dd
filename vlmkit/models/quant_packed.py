"""int8 layers that hold fbgemm's packed weight INSTEAD of their plain int8 copy (one copy, about the same bytes),
so every call, prefill and decode, runs the int8 x int8 GEMM with per-row dynamically quantized activations
(quant_kernels.int8_gemm). Measured on an AVX2 box (bench/quant_kernels.md): 1.6-1.8x an fp32 GEMM at 600 rows,
and at 1-8 rows as fast as or faster than torch's weight-only int8 kernel. The cost: activations are quantized to 7
bits per row (relative error of a layer's output ~1.6% against ~0.2% for the bf16-activation kernel).

`pack_model` converts a quantized model in place: every plain `Int8Linear` (not the token table, not an output head,
whose `project` reads rows of the plain weights), and with `vision=True` the float linears of the vision tower and
connector (quantized per output channel first). Nothing here reads or writes files: `export()` and the state dict
unpack the weights, so saving a packed model writes what the plain modules would have.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import quant_kernels
from .quant import Int8Linear, _Quantized, quantize_int8

VISION_PREFIXES = ("vision.", "connector.")


class PackedInt8Linear(_Quantized):
    """y = int8 GEMM(x, packed weights) (+ bias); the same export as Int8Linear (`qweight`, `scales`)."""

    kind = "int8"
    parts = Int8Linear.parts

    def __init__(self, packed, out_features: int, in_features: int, bias=None, dtype=torch.float32):
        super().__init__(dtype)
        self.out_features, self.in_features = out_features, in_features
        self.packed = packed  # a torch script object, not a tensor: not a buffer, never moved by .to()
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @classmethod
    def from_int8(cls, qweight, scales, bias=None, dtype=torch.float32) -> Optional["PackedInt8Linear"]:
        """None when this torch cannot pack (no fbgemm): the caller keeps its plain layer."""
        packed = quant_kernels.pack_int8(qweight.contiguous(), scales.float())
        return None if packed is None else cls(packed, *qweight.shape, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # fbgemm is a CPU backend
            return F.linear(x, self.dequantize().to(x), self.bias)
        y = quant_kernels.int8_gemm(x.reshape(-1, self.in_features), self.packed)
        return self._out(y, x, self.out_features)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        return quant_kernels.unpack_int8(self.packed)

    def dequantize(self) -> torch.Tensor:
        q, scales = self.int8()
        return q.float() * scales[:, None]

    def export(self) -> dict:
        q, scales = self.int8()
        return {"qweight": q, "scales": scales}

    def nbytes(self) -> int:
        """The packed weights' bytes (int8 values, a float scale and an int32 column offset per row)."""
        return self.out_features * (self.in_features + 8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """As a float linear's (`weight`, dequantized): a packed vision layer saves as the float layer it replaced;
        a decoder layer's entry is ignored by the quantized writer, which takes `export()`."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dequantize().to(self.weight.dtype)


def _is_head(name: str) -> bool:
    return name.rpartition(".")[2] == "lm_head"


@torch.no_grad()
def pack_model(model: nn.Module, vision: bool = False, decoder: bool = True) -> list[str]:
    """Convert in place (see the module's doc): the int8 layers (decoder=True) and the vision tower's float linears
    (vision=True). Returns the names converted; none where torch cannot pack."""
    done = []
    for name, module in list(model.named_modules()):
        if decoder and type(module) is Int8Linear and not _is_head(name):
            new = PackedInt8Linear.from_int8(module.qweight, module.scales, module.bias, module.weight.dtype)
        elif vision and type(module) is nn.Linear and name.startswith(VISION_PREFIXES):
            q, scales = quantize_int8(module.weight)
            new = PackedInt8Linear.from_int8(q, scales, module.bias, module.weight.dtype)
        else:
            continue
        if new is None:
            return done
        model.set_submodule(name, new)
        done.append(name)
    return done
