"""PEFT LoRA adapters: a folder with `adapter_config.json` and `adapter_model.safetensors`, keyed as peft keys the
modules of the transformers model of the family (`base_model.model.<module>.lora_A.weight`; a trained module kept
whole, peft's `modules_to_save`, as `base_model.model.<module>.<param>`). Written from vlmkit's LoRA training, read
back onto any vlmkit model of that family: `peft.PeftModel.from_pretrained(transformers_model, folder)` and
`vlmkit.load(base, adapter=folder)` give the same model.

Names go through the family's key map (keymaps.py) with transformers 5's in-memory prefixes (`Family.modules`);
adapters keyed by a saved checkpoint's names (as older transformers held them in memory) are read too, through the
family's aliases. Applying: merged into float weights (W + B A * alpha / r, in float32, then cast); a quantized
layer keeps the LoRA as a layer beside it (`LoRALinear`), since merging into int4/int8 would round the update away.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import VLMConfig
from ..models.lora import LoRALinear, merge_weight
from ..models.meta import shapes_only
from ..models.quant import is_quantized
from ..models.vlm import VLMModel
from .families import FAMILIES, Family
from .io import atomic_write
from .keymaps import build_key_map, normalize_names

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's wrapper (PeftModel.base_model) around the transformers model
LORA_PARTS = (".lora_A", ".lora_B")


class AdapterError(ValueError):
    pass


def family_of(cfg: VLMConfig) -> Family:
    return FAMILIES[cfg.extra.get("hf_architecture", cfg.family)]


def module_names(cfg: VLMConfig) -> dict:
    """Every parameter of a `cfg` model: our name -> transformers 5's in-memory name (what peft keys by)."""
    family = family_of(cfg)
    with shapes_only():
        state = VLMModel(cfg).state_dict()
    return build_key_map(state, cfg.connector.kind, family.modules or family.prefixes, cfg)


def is_peft_adapter(folder) -> bool:
    return (Path(folder) / CONFIG).is_file() and (Path(folder) / WEIGHTS).is_file()


# ------------------------------------------------------------------------------------------------- writing

def save_adapter(folder, cfg: VLMConfig, trained: dict, r: int, alpha: float, base_model: str) -> Path:
    """Write a peft LoRA adapter. `trained`: our names -> tensors, the LoRA pairs (`<module>.lora_A` / `.lora_B`)
    and whole trained tensors, which must lie in the connector (saved as peft's `modules_to_save`)."""
    family = family_of(cfg)
    names = module_names(cfg)
    connector = (family.modules or family.prefixes)["C"]
    tensors, targets, whole = {}, [], set()
    for ours, t in sorted(trained.items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        if ours.endswith(LORA_PARTS):
            module, part = ours.rsplit(".", 1)
            theirs = names[module + ".weight"].removesuffix(".weight")
            tensors[f"{PREFIX}{theirs}.{part}.weight"] = t
            targets.append(theirs)
            continue
        theirs = names.get(ours)
        if theirs is None or not connector or not theirs.startswith(connector):
            raise AdapterError(f"trained tensor {ours!r} is neither LoRA nor in the connector: a peft LoRA adapter "
                               "cannot hold it")
        tensors[PREFIX + theirs] = t
        whole.add(connector.rstrip("."))
    if not targets:
        raise AdapterError("no LoRA layer among the trained tensors")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        # exact module names: a short name like "q_proj" would also catch the vision tower's projections
        "target_modules": sorted(set(targets)), "modules_to_save": sorted(whole) or None,
        "rank_pattern": {}, "alpha_pattern": {},
        "auto_mapping": {"base_model_class": family.architectures[0]},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return folder


# ------------------------------------------------------------------------------------------------- reading

def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{folder / CONFIG}: not a readable JSON file ({e})") from None
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterError(f"{folder}: a {kind} adapter; vlmkit applies LoRA adapters only")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "lora_bias") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise AdapterError(f"{folder}: adapter options vlmkit does not apply: {', '.join(unsupported)}")
    return config


def _scale(config: dict, module: str, r: int) -> float:
    """peft's scaling for one module: lora_alpha (or its alpha_pattern entry) / r (/ sqrt(r) with rslora)."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (r ** 0.5 if config.get("use_rslora") else r)


def read_adapter(folder, cfg: VLMConfig) -> tuple[dict, dict]:
    """(our module -> (A, B, scale), our parameter -> whole tensor) of a peft LoRA adapter for a `cfg` model; an
    adapter key that names no module of this family is an error naming it."""
    folder = Path(folder)
    if not is_peft_adapter(folder):
        raise AdapterError(f"{folder} is not a peft adapter folder (it needs {CONFIG} and {WEIGHTS})")
    config = read_config(folder)
    tensors = load_file(str(folder / WEIGHTS))
    family = family_of(cfg)
    ours_of = {v: k for k, v in module_names(cfg).items()}
    by_file = {v: k for k, v in build_key_map(ours_of.values(), cfg.connector.kind, family.prefixes, cfg).items()}

    def ours(theirs: str, key: str) -> str:
        if theirs in ours_of:
            return ours_of[theirs]
        canonical = normalize_names([theirs], family.aliases)[theirs]
        if canonical in by_file:
            return by_file[canonical]
        raise AdapterError(f"{folder}: adapter tensor {key!r} names no weight of this {family.name} model "
                           f"({theirs!r})")

    pairs, whole = {}, {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
        if m is not None:
            module = ours(m.group(1) + ".weight", key).removesuffix(".weight")
            pairs.setdefault(module, {})[m.group(2)] = (key, t)
        elif ".lora_" in name:
            raise AdapterError(f"{folder}: adapter tensor {key!r} is a kind of LoRA vlmkit does not apply")
        else:
            whole[ours(name, key)] = (key, t)
    lora = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{folder}: {module} has {sorted(parts)} but needs both lora_A and lora_B")
        (key_a, a), (key_b, b) = parts["lora_A"], parts["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{folder}: {key_a} {tuple(a.shape)} and {key_b} {tuple(b.shape)} are no LoRA pair")
        theirs = key_a.removeprefix(PREFIX).split(".lora_A")[0]
        lora[module] = (a, b, _scale(config, theirs, a.shape[0]), key_a, key_b)
    return lora, whole


# ------------------------------------------------------------------------------------------------- applying

def apply_adapter(model: VLMModel, folder) -> dict:
    """Apply a peft LoRA adapter to `model` in place: merged into float weights, kept beside quantized ones; whole
    tensors (modules_to_save) replace the model's. Returns {"merged", "layers", "replaced"} counts."""
    lora, whole = read_adapter(folder, model.cfg)
    merged = layers = 0
    for module_name, (a, b, scale, key_a, key_b) in sorted(lora.items()):
        module = model.get_submodule(module_name)
        out_features, in_features = _shape(module, module_name)
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterError(f"{folder}: {key_a} {tuple(a.shape)} / {key_b} {tuple(b.shape)} do not fit "
                               f"{module_name} ({out_features} x {in_features}): the adapter is for another base "
                               "model")
        if is_quantized(module):
            parent, _, child = module_name.rpartition(".")
            ref = next(t for t in module.buffers() if t.is_floating_point())
            wrapped = LoRALinear.with_weights(module, a.to(ref.device, ref.dtype), b.to(ref.device, ref.dtype), scale)
            model.get_submodule(parent).register_module(child, wrapped)
            layers += 1
        else:
            with torch.no_grad():
                w = module.weight
                module.weight.copy_(merge_weight(w.float(), a.to(w.device, torch.float32),
                                                 b.to(w.device, torch.float32), scale).to(w.dtype))
            merged += 1
    params = dict(model.named_parameters())
    for name, (key, t) in sorted(whole.items()):
        p = params.get(name)
        if p is None:  # a quantized layer's weight is a buffer now
            raise AdapterError(f"{folder}: {key} replaces {name}, which this model holds quantized; load it "
                               "without quantize=")
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterError(f"{folder}: {key} {tuple(t.shape)} does not fit {name} {tuple(p.shape)}: the adapter "
                               "is for another base model")
        with torch.no_grad():
            p.copy_(t.to(p.device, p.dtype))
    return {"merged": merged, "layers": layers, "replaced": len(whole)}


def _shape(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, nn.Linear) or (is_quantized(module) and hasattr(module, "in_features")):
        return module.out_features, module.in_features
    raise AdapterError(f"{name} is a {type(module).__name__}, not a linear layer: vlmkit applies LoRA to linear "
                       "layers only")
