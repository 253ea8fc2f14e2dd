"""All stages of the recipe, in order (see the package docstring for what each one does and why)."""

from __future__ import annotations

import torch

from .config import RecipeConfig
from .language import train_language
from .model_folder import export_adapter, load_vision, prepare_folder
from .vision import train_shapes, train_vision
from .words import train_words


def train_default(cfg: RecipeConfig) -> None:
    """Train the default model into `cfg.out` and write its adapter folder to `cfg.ship` (or `cfg.out`).
    `cfg.init_vision`: an earlier default model's ViT replaces stages 0a and 0b; `cfg.init_from`: an earlier
    default model entire (ViT, connector, LoRA), which stages 0c and 1 then go on training."""
    torch.manual_seed(cfg.seed)
    model, processor = prepare_folder(cfg.out, cfg)
    if torch.cuda.is_available():
        model.cuda()
    init_lora = None
    if cfg.init_from is not None:
        init_lora = {k: v for k, v in load_vision(model, cfg.init_from, connector=True).items() if ".lora_" in k}
    elif cfg.init_vision is not None:
        load_vision(model, cfg.init_vision)
    else:
        if cfg.shape.steps:
            train_shapes(model, processor, cfg.out, cfg)
        train_vision(model, processor, cfg.out, cfg)
    if cfg.word.steps:
        train_words(model, processor, cfg.out, cfg, from_zero=cfg.init_from is None)
    words = bool(cfg.word.steps) or cfg.init_from is not None  # an earlier default model's tokens are word-like
    train_language(model, processor, cfg.out, cfg, words=words, init_lora=init_lora)
    export_adapter(model, cfg.out, cfg.ship or cfg.out)
