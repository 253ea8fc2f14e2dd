"""Writing a model folder: weights (float or saved-quantized), config, the processor files of the folder it came
from, and a model card."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..models.lora import LoRALinear
from ..models.quant import quantization_of
from ..models.vlm import VLMModel
from .folder_config import default_model_path
from .hf import save_model
from .model_card import write_model_card
from .quantized import save_quantized

# Files of a Hugging Face folder that describe the processor (copied by `save`).
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


# What the embedded default model's card says it comes from: its language model, SmolLM2, whose license (Apache
# 2.0) is also vlmkit's.
DEFAULT_MODEL_CARD = {
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_model_relation": "finetune", "license": "apache-2.0",
    "description": "saved from vlmkit's embedded default model (a small ViT trained from scratch and a pixel-shuffle "
                   "connector over SmolLM2-135M-Instruct with LoRA merged; its MODEL_CARD.md in the vlmkit package "
                   "describes the training)",
}


def write_model_folder(model: VLMModel, folder, source: Optional[Path] = None) -> None:
    """`model`'s weights and config into `folder` (quantized ones as saved-quantized), the processor files of
    the folder it came from (`source`) and a model card (kept if the folder has a README.md of the user's)."""
    folder = Path(folder)
    if any(isinstance(layer, LoRALinear) for layer in model.modules()):
        raise ValueError("this model holds LoRA layers beside quantized weights (an adapter over a quantized model), "
                         "which a saved folder cannot: load it without quantize= to save it merged, or keep the "
                         "adapter folder")
    if quantization_of(model):
        save_quantized(model, folder)
    else:
        save_model(model, folder)
    if source is not None and Path(source).resolve() != folder.resolve():
        for name in PROCESSOR_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, folder / name)
    write_model_card(folder, model=model, source=source, quantization=quantization_of(model),
                     **card_defaults(source))


def card_defaults(source) -> dict:
    """Model card fields a folder cannot tell by itself (the embedded default model's base and license)."""
    is_default = source is not None and Path(source).resolve() == default_model_path().resolve()
    return dict(DEFAULT_MODEL_CARD) if is_default else {}
