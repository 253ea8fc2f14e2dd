"""LoRA: the adapter layer and the one merge rule, W + B A * alpha / r. Training wraps layers with `LoRALinear`
(vlmkit.train.lora); loaders merge saved adapters into the weights they read (vlmkit.checkpoints.adapter, and
vlmkit.checkpoints.peft, which keeps `LoRALinear` layers beside quantized weights instead)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .quant import is_quantized, train_through_quantized


def merge_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + B A * scale: the delta computed in the adapters' dtype, the sum in the weight's."""
    return weight + (lora_b @ lora_a * scale).to(weight.dtype)


class LoRALinear(nn.Module):
    """y = base(x) + (x A^T B^T) * alpha / r, with B starting at zero so training starts from the base model."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base = base
        self.r, self.scale = r, alpha / r
        ref = _float_reference(base)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=ref.dtype, device=ref.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=ref.dtype, device=ref.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        base.requires_grad_(False)
        if is_quantized(base):
            train_through_quantized(base)

    @classmethod
    def with_weights(cls, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> "LoRALinear":
        """A frozen layer applying trained adapters (A: r x in, B: out x r) beside `base`, for inference."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.base, layer.r, layer.scale = base, lora_a.shape[0], scale
        layer.lora_A = nn.Parameter(lora_a, requires_grad=False)
        layer.lora_B = nn.Parameter(lora_b, requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear holding base + delta (a quantized base is dequantized first)."""
        ref = _float_reference(self.base)
        weight = self.base.dequantize().to(ref.dtype) if is_quantized(self.base) else self.base.weight
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            out.weight.copy_(merge_weight(weight, self.lora_A, self.lora_B, self.scale))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _float_reference(base: nn.Module) -> torch.Tensor:
    """A float tensor of the layer (its weight, or a quantized layer's scales) for dtype and device."""
    if isinstance(getattr(base, "weight", None), torch.Tensor) and base.weight.numel():
        return base.weight
    return next(t for t in base.buffers() if t.is_floating_point())
