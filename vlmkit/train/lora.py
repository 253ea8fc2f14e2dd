"""LoRA: low-rank adapters on chosen Linear layers, trained while the base stays frozen, merged before saving."""

from __future__ import annotations

import math

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear holding base + delta (a quantized base is dequantized first)."""
        ref = _float_reference(self.base)
        weight = self.base.dequantize().to(ref.dtype) if is_quantized(self.base) else self.base.weight
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            out.weight.copy_(weight + self.delta().to(ref.dtype))
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
            if child_name in targets and (isinstance(child, nn.Linear) or is_quantized(child)):
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


# ------------------------------------------------------------------------------------------------ QLoRA
# LoRA over a frozen weight-only quantized base (vlmkit.quantize). Its packed CPU kernels have no backward, so the
# gradient to the layer's input (which every LoRA below the layer needs) is computed here: dx = dy @ W with W
# dequantized for that backward only; the weights themselves never get a gradient.

def is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "dequantize") and hasattr(module, "export")


def _float_reference(base: nn.Module) -> torch.Tensor:
    """A float tensor of the layer (its weight, or a quantized layer's scales) for dtype and device."""
    if isinstance(getattr(base, "weight", None), torch.Tensor) and base.weight.numel():
        return base.weight
    return next(t for t in base.buffers() if t.is_floating_point())


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
    q = _unpack(module._nibbles).float().reshape(module.out_features, -1, module.group_size)
    return (q * module._scales[..., None] + module._mins[..., None]).reshape(module.out_features, -1)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    from ..quantize import unpack_nibbles

    return unpack_nibbles(packed)


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


def train_through_all_quantized(model: nn.Module) -> int:
    """Every quantized layer of the model (e.g. the int8 output head) passes gradients to its input."""
    layers = [m for m in model.modules() if is_quantized(m)]
    for m in layers:
        train_through_quantized(m)
    return len(layers)
