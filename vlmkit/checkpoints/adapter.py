"""Adapter folders: a Hugging Face config + processor files + only the weights trained here (vision, connector,
LoRA), with the language model read from a GGUF file at load time. This is how the embedded default model ships
without carrying SmolLM2's 135M parameters in the package. `vlmkit.save` writes it back as a full folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..models.lora import merge_weight
from ..models.quant import QuantSpec
from ..models.vlm import VLMModel
from .builder import TensorSource, build_model
from .folder_config import ADAPTER, CheckpointError, config_from_folder
from .gguf_header import resolve_gguf


def is_adapter_folder(folder) -> bool:
    return (Path(folder) / ADAPTER).is_file()


def grow_vocab(text_state: dict, vocab_size: int) -> dict:
    """GGUF text weights under our names (prefix `text.`), the token table grown to the checkpoint's vocabulary."""
    from .gguf import grow_rows

    state = {f"text.{k}": v for k, v in text_state.items()}
    state["text.embed_tokens.weight"] = grow_rows(state["text.embed_tokens.weight"], vocab_size)
    return state


class AdapterSource(TensorSource):
    """An adapter folder's tensors: the trained ones (vision, connector) from adapter.safetensors, the language model
    from its GGUF with the saved LoRA merged into the weights it adapts."""

    what = "adapter"

    def __init__(self, folder):
        from .gguf import GGUFSource, open_gguf  # here: the gguf library's import (~0.15 s) is no cost of `vlmkit info`

        self.origin = folder = Path(folder)
        self.cfg, _, hf = config_from_folder(folder)
        meta = hf.get("vlmkit_adapter")
        if not meta:
            raise CheckpointError(f"{folder}: {ADAPTER} present but config.json has no 'vlmkit_adapter' section")
        adapter = load_file(folder / ADAPTER)
        self.lora = {k: v.float() for k, v in adapter.items() if ".lora_" in k}
        self.scale = meta["lora"]["alpha"] / meta["lora"]["r"] if self.lora else 0.0
        self.trained = {k: v for k, v in adapter.items() if ".lora_" not in k}
        # head counts from the folder's own config: read_metadata would turn the whole vocabulary into Python
        # strings (~100 MB held at the load's peak) for two numbers
        self.text = GGUFSource(open_gguf(resolve_gguf(meta["base_gguf"])), self.cfg.text, prefix="text.",
                               vocab_size=self.cfg.text.vocab_size)

    @property
    def merged_modules(self) -> frozenset:
        """The modules a LoRA adapts (their weights are merged with it as they are read)."""
        return frozenset(k[: -len(".lora_A")] for k in self.lora if k.endswith(".lora_A"))

    def keys(self, expected: dict) -> list[str]:
        return [k for k in self.text.keys() if k not in self.trained] + list(self.trained)

    def read(self, name: str) -> torch.Tensor:
        if name in self.trained:
            return self.trained[name].float()
        w, module = self.text.read(name), name.rpartition(".")[0]
        if module + ".lora_A" in self.lora and name.endswith(".weight"):
            w = merge_weight(w, self.lora[module + ".lora_A"], self.lora[module + ".lora_B"], self.scale)
        return w

    def nbytes(self, name: str) -> int:
        if name in self.trained:
            return self.trained[name].numel() * self.trained[name].element_size()
        return self.text.nbytes(name)

    def read_quantized(self, name: str, kind: str, dtype: torch.dtype):
        if name in self.trained or name.rpartition(".")[0] in self.merged_modules:
            return None  # LoRA-merged weights are quantized after the merge
        return self.text.read_quantized(name, kind, dtype)


def load_adapter_model(folder, dtype: Optional[torch.dtype] = None, device=None,
                       quantize: Optional[QuantSpec] = None, progress: Optional[bool] = None) -> VLMModel:
    """An adapter folder as a VLMModel (float32 unless `dtype`). int4: the LoRA-merged projections stay 8-bit --
    the trained delta is far below a 4-bit step, and requantizing the merged weight to 4 bits lost it (measured on
    the default model: "Paris" became "L'Etoile ...")."""
    source = AdapterSource(folder)
    if quantize is not None:
        quantize = replace(quantize, int8=quantize.int8 | source.merged_modules)
    return build_model(source.cfg, source, dtype, device, quantize, progress)


def write_adapter_config(folder, hf_config: dict, base_gguf: str, lora: Optional[dict]) -> None:
    hf = dict(hf_config)
    hf["vlmkit_adapter"] = {"base_gguf": base_gguf, "lora": lora}
    (Path(folder) / "config.json").write_text(json.dumps(hf, indent=2))
