"""Stages 0a and 0b of the default recipe: the ViT alone learns the generator's labels through small heads, with
no language model in the loop (fast). 0a: the shape under each patch, alone; 0b: scene-level heads on the
pixel-shuffled tokens and per-patch heads on the ViT's outputs (see `default_recipe`'s docstring for why)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.connectors import pixel_shuffle
from ..models.vlm import VLMModel
from .default_recipe import (
    PATCH_GRID, SHAPE_CATEGORIES, SHUFFLE, TOKENS_PER_IMAGE, VISION, VISION_LR, pixels, precision,
)
from .loop import TrainConfig, run


class VisionHeads(nn.Module):
    """Scene-level classification heads on the pixel-shuffled ViT tokens (what the connector sees) and per-patch
    heads on the ViT's patch outputs."""

    def __init__(self, width: int, tokens: int, classes: dict, patch_width: int, patch_classes: dict):
        super().__init__()
        self.reduce = nn.Linear(width, 128)
        self.classes = classes
        self.heads = nn.ModuleDict({k: nn.Linear(128 * tokens, n) for k, n in classes.items()})
        self.patch_heads = nn.ModuleDict({k: nn.Linear(patch_width, n) for k, n in patch_classes.items()})

    def forward(self, patches: torch.Tensor) -> tuple[dict, dict]:
        h = F.gelu(self.reduce(pixel_shuffle(patches, SHUFFLE))).flatten(1)
        return ({k: head(h) for k, head in self.heads.items()},
                {k: head(patches) for k, head in self.patch_heads.items()})


def vision_classes() -> dict:
    from ..data.synthetic import COLORS, LABEL_CLASSES, SHAPES

    classes = {k: n for k, n in LABEL_CLASSES.items() if k not in ("shape_counts", "color_counts")}
    classes.update({f"count_{s}": 13 for s in SHAPES})
    classes.update({f"count_{c}": 13 for c in COLORS})
    return classes


def vision_labels(sample) -> dict:
    from ..data.synthetic import COLORS, SHAPES, scene_labels

    lab = scene_labels(sample)
    flat = {k: v for k, v in lab.items() if k not in ("shape_counts", "color_counts")}
    if lab["count"] >= 0:  # shapes scenes only
        flat.update({f"count_{s}": n for s, n in zip(SHAPES, lab["shape_counts"])})
        flat.update({f"count_{c}": n for c, n in zip(COLORS, lab["color_counts"])})
    return flat


def patch_classes() -> dict:
    from ..data.synthetic import COLORS, SHAPES

    return {"patch_color": len(COLORS) + 1, "patch_shape": len(SHAPES) + 1, "patch_center": 2}  # last = none


def patch_labels(sample, grid: int = PATCH_GRID) -> dict:
    """Per-patch targets (raster order) of the first image: the colour and shape of the object under the patch
    centre (last class: none) and whether an object's centre lies in the patch (for counting); patches inside a
    text's box take its colour (shape: none)."""
    from ..data.synthetic import COLORS, SHAPES

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


def vision_stage(model: VLMModel) -> nn.ModuleDict:
    """Stage 0's trainable module: the model's ViT and fresh heads."""
    heads = VisionHeads(VISION.hidden_size * SHUFFLE**2, TOKENS_PER_IMAGE, vision_classes(), VISION.hidden_size,
                        patch_classes())
    return nn.ModuleDict({"vision": model.vision, "heads": heads.to(model.device)})


def vision_batch(processor, samples: list) -> dict:
    """Stage 0's inputs and targets: first images, scene labels (-1: not applicable), per-patch labels."""
    labels = [vision_labels(s) for s in samples]
    dense = [patch_labels(s) for s in samples]
    return {"pixel_values": pixels(processor, [s.images[0] for s in samples]),
            "labels": {k: torch.tensor([lab.get(k, -1) for lab in labels]) for k in vision_classes()},
            "patch_labels": {k: torch.stack([d[k] for d in dense]) for k in patch_classes()}}


def shape_stage(model: VLMModel) -> nn.ModuleDict:
    """Stage 0a's trainable module: the model's ViT and a per-patch shape head."""
    from ..data.synthetic import SHAPES

    head = nn.Linear(VISION.hidden_size, len(SHAPES) + 1)
    return nn.ModuleDict({"vision": model.vision, "shape_head": head.to(model.device)})


def shape_batch(processor, samples: list) -> dict:
    return {"pixel_values": pixels(processor, [s.images[0] for s in samples]),
            "patch_shape": torch.stack([patch_labels(s)["patch_shape"] for s in samples])}


def shape_loss(m: nn.ModuleDict, batch: dict) -> torch.Tensor:
    from ..data.synthetic import SHAPES

    logits = m["shape_head"](m["vision"](batch["pixel_values"])).float()
    weight = torch.ones(len(SHAPES) + 1, device=logits.device)
    weight[-1] = 0.1  # most patches are background
    return F.cross_entropy(logits.flatten(0, 1), batch["patch_shape"].flatten(), weight=weight)


def train_shapes(model: VLMModel, processor, out: Path, steps: int, batch_size: int, seed: int = 2) -> list:
    """Stage 0a: the per-patch shape target alone, on shape scenes. Shapes are the slow thing for a ViT from
    scratch, and among stage 0's many easy terms they were not learnt at all (see the module docstring)."""
    from ..data.synthetic import SyntheticGenerator

    gen = SyntheticGenerator(seed, categories=SHAPE_CATEGORIES, stage=2)

    def make_batch(step):
        return shape_batch(processor, [gen.qa_sample(step * batch_size + j) for j in range(batch_size)])

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=6e-4, warmup=0.02, weight_decay=0.05,
                      log_every=10, ckpt_every=50, seed=seed, precision=precision())
    return run(shape_stage(model), make_batch, shape_loss, cfg, ckpt_path=out / "stage0-shapes.ckpt",
               label="shapes")


def train_vision(model: VLMModel, processor, out: Path, steps: int, batch_size: int, seed: int = 0) -> list:
    from ..data.synthetic import SINGLE_IMAGE_CATEGORIES, SyntheticGenerator

    gen = SyntheticGenerator(seed, categories=SINGLE_IMAGE_CATEGORIES, stage=2)

    def make_batch(step):
        return vision_batch(processor, [gen.qa_sample(step * batch_size + j) for j in range(batch_size)])

    def loss_fn(m, batch):
        scene_logits, patch_logits = m["heads"](m["vision"](batch["pixel_values"]))
        scene = [F.cross_entropy(scene_logits[k], y, ignore_index=-1) for k, y in batch["labels"].items()
                 if (y >= 0).any()]
        dense = [F.cross_entropy(patch_logits[k].flatten(0, 1), y.flatten()) for k, y in batch["patch_labels"].items()]
        return torch.stack(scene).mean() + torch.stack(dense).mean()

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=VISION_LR, warmup=0.05, weight_decay=0.05,
                      log_every=10, ckpt_every=50, seed=seed, precision=precision())
    return run(vision_stage(model), make_batch, loss_fn, cfg, ckpt_path=out / "stage0-vision.ckpt", label="vision")
