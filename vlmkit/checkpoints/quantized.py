"""Quantized models on disk. `save_quantized` writes a Hugging Face-style folder (config.json with
`quantization_config`, float tensors under their usual names, each quantized weight as
`<name>.qweight/.scales(/.mins)`: vlmkit reads it back, transformers does not). `load_quantized` builds a quantized
model tensor by tensor (never the whole float model at once) from a Hugging Face folder, an adapter folder (GGUF
text model) or a folder written by `save_quantized`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..models.quant import DEFAULT_GROUP, QuantSpec, check_mode, quantization_of
from ..models.vlm import VLMModel
from .adapter import is_adapter_folder, load_adapter_model
from .builder import build_model
from .families import FAMILIES
from .folder_config import INDEX, WEIGHTS, saved_quantization
from .hf import SafetensorsSource, hf_config_for
from .io import atomic_write
from .keymaps import build_key_map


def save_quantized(model: VLMModel, folder) -> None:
    info = quantization_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = info["modules"]
    cfg = model.cfg
    family = FAMILIES[cfg.extra.get("hf_architecture", cfg.family)]
    # our name -> HF name for the float layout of the model (quantized modules as their `.weight`)
    names = [n for n in model.state_dict() if n.rpartition(".")[0] not in kinds or n.endswith(".bias")]
    key_map = build_key_map(names + [f"{name}.weight" for name in kinds], cfg.connector.kind, family.prefixes, cfg)
    tensors = {}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module not in kinds or leaf == "bias":
            tensors[key_map[name]] = t.detach().contiguous().cpu()
    for name in kinds:
        base = key_map[f"{name}.weight"][: -len("weight")]
        for suffix, t in model.get_submodule(name).export().items():
            tensors[base + suffix] = t.detach().contiguous().cpu()
    hf = dict(hf_config_for(cfg))
    hf["dtype"] = str(model.dtype).removeprefix("torch.")
    hf["quantization_config"] = info
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(hf, indent=2)))
    atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    (folder / INDEX).unlink(missing_ok=True)


def load_quantized(folder, mode: Optional[str] = None, dtype: Optional[torch.dtype] = None, device=None,
                   vision: bool = False, group_size: int = DEFAULT_GROUP, progress: Optional[bool] = None) -> VLMModel:
    """A quantized VLMModel from a Hugging Face folder, an adapter folder, or a folder saved quantized (whose own
    settings then apply; `mode` must be None or the same). progress: the load's bar (builder.progress_enabled)."""
    folder = Path(folder)
    saved = saved_quantization(folder)
    if saved and mode not in (None, saved["mode"]):
        raise ValueError(f"{folder} is saved {saved['mode']}-quantized; load it with quantize=None or "
                         f"{saved['mode']!r}, or quantize the float model it came from")
    if is_adapter_folder(folder) and not saved:
        return load_adapter_model(folder, dtype or torch.float32, device,
                                  QuantSpec(check_mode(mode), group_size, vision), progress)
    if saved:
        spec = QuantSpec(saved["mode"], saved["group_size"], modules=dict(saved["modules"]))
        source = SafetensorsSource(folder, packed=spec.modules, group_size=spec.group_size)
    else:
        spec, source = QuantSpec(check_mode(mode), group_size, vision), SafetensorsSource(folder)
    if dtype is None:  # as stored, like the float loader
        stored = source.hf.get("dtype") or source.hf.get("torch_dtype") or source.hf.get("text_config", {}).get("dtype")
        dtype = getattr(torch, stored) if isinstance(stored, str) and hasattr(torch, stored) else None
    return build_model(source.cfg, source, dtype or torch.float32, device, spec, progress)
