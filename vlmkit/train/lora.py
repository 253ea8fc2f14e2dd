"""LoRA in training: wrap chosen Linear layers with adapters while the base stays frozen, merge them before
saving. The layer and the merge rule live in vlmkit.models.lora; a quantized base passes gradients through
vlmkit.models.quant.train_through_quantized."""

from __future__ import annotations

from torch import nn

from ..models.lora import LoRALinear
from ..models.quant import is_quantized, train_through_quantized


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


def train_through_all_quantized(model: nn.Module) -> int:
    """Every quantized layer of the model (e.g. the int8 output head) passes gradients to its input."""
    layers = [m for m in model.modules() if is_quantized(m)]
    for m in layers:
        train_through_quantized(m)
    return len(layers)
