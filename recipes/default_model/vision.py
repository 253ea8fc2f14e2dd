"""Stages 0a and 0b: the ViT alone learns the generator's labels through small heads, with no language model in
the loop (fast). 0a: the shape under each patch, alone -- shapes are what a small ViT from scratch learns slowly,
and mixed with 0b's many easy terms it did not learn them at all; 0b: scene-level heads on the pixel-shuffled
tokens (counts, biggest object, word, chart) and per-patch heads on the ViT's outputs (the colour and shape of the
object under each patch, where objects' centres are), meant to make every token say which object is where."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.synthetic import (
    COLORS, LABEL_CLASSES, SHAPES, SINGLE_IMAGE_CATEGORIES, SyntheticGenerator, scene_labels,
)
from vlmkit.models.connectors import pixel_shuffle
from vlmkit.models.vlm import VLMModel
from vlmkit.train.loop import run

from .config import Architecture, RecipeConfig, Stage
from .model_folder import pixels, precision

SHAPE_CATEGORIES = ("shape", "counting", "color")  # the categories whose scenes are shapes


class VisionHeads(nn.Module):
    """Scene-level classification heads on the pixel-shuffled ViT tokens (what the connector sees) and per-patch
    heads on the ViT's patch outputs."""

    def __init__(self, width: int, tokens: int, classes: dict, patch_width: int, patch_classes: dict, shuffle: int):
        super().__init__()
        self.shuffle = shuffle
        self.reduce = nn.Linear(width, 128)
        self.classes = classes
        self.heads = nn.ModuleDict({k: nn.Linear(128 * tokens, n) for k, n in classes.items()})
        self.patch_heads = nn.ModuleDict({k: nn.Linear(patch_width, n) for k, n in patch_classes.items()})

    def forward(self, patches: torch.Tensor) -> tuple[dict, dict]:
        h = F.gelu(self.reduce(pixel_shuffle(patches, self.shuffle))).flatten(1)
        return ({k: head(h) for k, head in self.heads.items()},
                {k: head(patches) for k, head in self.patch_heads.items()})


def vision_classes() -> dict:
    classes = {k: n for k, n in LABEL_CLASSES.items() if k not in ("shape_counts", "color_counts")}
    classes.update({f"count_{s}": 13 for s in SHAPES})
    classes.update({f"count_{c}": 13 for c in COLORS})
    return classes


def vision_labels(sample) -> dict:
    lab = scene_labels(sample)
    flat = {k: v for k, v in lab.items() if k not in ("shape_counts", "color_counts")}
    if lab["count"] >= 0:  # shapes scenes only
        flat.update({f"count_{s}": n for s, n in zip(SHAPES, lab["shape_counts"])})
        flat.update({f"count_{c}": n for c, n in zip(COLORS, lab["color_counts"])})
    return flat


def patch_classes() -> dict:
    return {"patch_color": len(COLORS) + 1, "patch_shape": len(SHAPES) + 1, "patch_center": 2}  # last = none


def patch_labels(sample, grid: int) -> dict:
    """Per-patch targets (raster order, `grid` patches a side) of the first image: the colour and shape of the
    object under the patch centre (last class: none) and whether an object's centre lies in the patch (for
    counting); patches inside a text's box take its colour (shape: none)."""
    scene = sample.meta["scenes"][0]
    width, height = scene["width"], scene["height"]
    color = torch.full((grid, grid), len(COLORS), dtype=torch.long)
    shape = torch.full((grid, grid), len(SHAPES), dtype=torch.long)
    center = torch.zeros((grid, grid), dtype=torch.long)
    centres = (torch.arange(grid) + 0.5) / grid
    ys, xs = torch.meshgrid(centres * height, centres * width, indexing="ij")
    for o in scene.get("objects") or []:
        row, col = min(grid - 1, int(o["y"] / height * grid)), min(grid - 1, int(o["x"] / width * grid))
        under = (xs - o["x"]).hypot(ys - o["y"]) < 0.75 * o["r"]
        under[row, col] = True  # a small object still marks the patch its centre falls in
        color[under], shape[under] = COLORS.index(o["color"]), SHAPES.index(o["shape"])
        center[row, col] = 1
    for t in scene.get("texts") or []:
        x0, y0, x1, y1 = t["box"]
        color[(xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)] = COLORS.index(t["color"])
    return {"patch_color": color.flatten(), "patch_shape": shape.flatten(), "patch_center": center.flatten()}


def vision_stage(model: VLMModel, arch: Architecture) -> nn.ModuleDict:
    """Stage 0b's trainable module: the model's ViT and fresh heads."""
    heads = VisionHeads(arch.vision_width * arch.shuffle**2, arch.tokens_per_image, vision_classes(),
                        arch.vision_width, patch_classes(), arch.shuffle)
    return nn.ModuleDict({"vision": model.vision, "heads": heads.to(model.device)})


def vision_batch(processor, samples: list, arch: Architecture) -> dict:
    """Stage 0b's inputs and targets: first images, scene labels (-1: not applicable), per-patch labels."""
    labels = [vision_labels(s) for s in samples]
    dense = [patch_labels(s, arch.patch_grid) for s in samples]
    return {"pixel_values": pixels(processor, [s.images[0] for s in samples]),
            "labels": {k: torch.tensor([lab.get(k, -1) for lab in labels]) for k in vision_classes()},
            "patch_labels": {k: torch.stack([d[k] for d in dense]) for k in patch_classes()}}


def vision_loss(m: nn.ModuleDict, batch: dict) -> torch.Tensor:
    scene_logits, patch_logits = m["heads"](m["vision"](batch["pixel_values"]))
    scene = [F.cross_entropy(scene_logits[k], y, ignore_index=-1) for k, y in batch["labels"].items()
             if (y >= 0).any()]
    dense = [F.cross_entropy(patch_logits[k].flatten(0, 1), y.flatten()) for k, y in batch["patch_labels"].items()]
    return torch.stack(scene).mean() + torch.stack(dense).mean()


def shape_stage(model: VLMModel, arch: Architecture) -> nn.ModuleDict:
    """Stage 0a's trainable module: the model's ViT and a per-patch shape head."""
    head = nn.Linear(arch.vision_width, len(SHAPES) + 1)
    return nn.ModuleDict({"vision": model.vision, "shape_head": head.to(model.device)})


def shape_batch(processor, samples: list, arch: Architecture) -> dict:
    return {"pixel_values": pixels(processor, [s.images[0] for s in samples]),
            "patch_shape": torch.stack([patch_labels(s, arch.patch_grid)["patch_shape"] for s in samples])}


def shape_loss(m: nn.ModuleDict, batch: dict, background_weight: float) -> torch.Tensor:
    logits = m["shape_head"](m["vision"](batch["pixel_values"])).float()
    weight = torch.ones(len(SHAPES) + 1, device=logits.device)
    weight[-1] = background_weight
    return F.cross_entropy(logits.flatten(0, 1), batch["patch_shape"].flatten(), weight=weight)


def train_head_stage(module: nn.Module, processor, out: Path, stage: Stage, arch: Architecture, categories: tuple,
                     make: Callable, loss_fn: Callable, name: str) -> list:
    """Train `module` (the ViT and its heads) on batches `make(processor, samples, arch)` of `categories`; its
    checkpoint is `out/stage0-{name}.ckpt`."""
    gen = SyntheticGenerator(stage.seed, categories=categories, stage=2)

    def make_batch(step):
        return make(processor, [gen.qa_sample(step * stage.batch_size + j) for j in range(stage.batch_size)], arch)

    return run(module, make_batch, loss_fn, stage.train_config(precision()), ckpt_path=out / f"stage0-{name}.ckpt",
               label=name)


def train_shapes(model: VLMModel, processor, out: Path, cfg: RecipeConfig) -> list:
    """Stage 0a: the per-patch shape target alone, on shape scenes."""
    loss_fn = partial(shape_loss, background_weight=cfg.shape.background_weight)
    return train_head_stage(shape_stage(model, cfg.arch), processor, out, cfg.shape, cfg.arch, SHAPE_CATEGORIES,
                            shape_batch, loss_fn, "shapes")


def train_vision(model: VLMModel, processor, out: Path, cfg: RecipeConfig) -> list:
    """Stage 0b: the scene-level and per-patch heads, on the single-image categories."""
    return train_head_stage(vision_stage(model, cfg.arch), processor, out, cfg.vision, cfg.arch,
                            SINGLE_IMAGE_CATEGORIES, vision_batch, vision_loss, "vision")
