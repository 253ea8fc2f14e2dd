"""LoRA: low-rank adapters on chosen Linear layers, trained while the base stays frozen, merged before saving."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (x A^T B^T) * alpha / r, with B starting at zero so training starts from the base model."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base = base
        self.r, self.scale = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta().to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def add_lora(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16.0,
             under: str = "text.layers") -> list[str]:
    """Wrap every Linear named in `targets` below `under` (e.g. the decoder's self-attention) with LoRA."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if not name.startswith(under):
            continue
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha))
                wrapped.append(f"{name}.{child_name}")
    if not wrapped:
        raise ValueError(f"no Linear named {targets} under {under!r}")
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by a plain Linear holding base + delta; returns how many were merged."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                count += 1
    return count


def lora_state_dict(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}


def apply_lora_deltas(state: dict, lora: dict, scale: float) -> dict:
    """Merge saved adapters into a plain state dict: W += B A * scale for each `<name>.lora_A/B` pair."""
    out = dict(state)
    for key in lora:
        if key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            a, b = lora[key], lora[name + ".lora_B"]
            weight = out[name + ".weight"]
            out[name + ".weight"] = weight + (b.float() @ a.float() * scale).to(weight.dtype)
    return out
