"""How well did the default recipe's vision stage learn? Held-out accuracy of its stage-0 heads (scene-level heads,
and per-patch heads on the patches that lie on an object), from a run folder's `stage0-vision.ckpt`, and of stage
0a's shape head from `stage0-shapes.ckpt` (whichever exist).

    python -m recipes.default_model.probes.vision_heads runs/default [--images 512]
    python -m recipes.default_model.probes.vision_heads runs/default --image examples/shapes.png  # 0b's view, per patch
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

from vlmkit.data.synthetic import BENCHMARK_SEED, COLORS, SHAPES, SINGLE_IMAGE_CATEGORIES, SyntheticGenerator
from vlmkit.train.loop import load_checkpoint

from ..config import RecipeConfig
from ..model_folder import pixels, prepare_folder
from ..vision import SHAPE_CATEGORIES, shape_batch, shape_stage, vision_batch, vision_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a `python -m recipes.default_model --out` folder")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--image", type=Path, help="instead: print the per-patch shape / colour heads' map of this image")
    args = ap.parse_args()
    recipe = RecipeConfig()
    model, processor = prepare_folder(Path(tempfile.mkdtemp()), recipe)
    if args.image:
        return patch_map(model, processor, args.run, args.image, recipe)
    right, total = {}, {}

    def count(key, hits, n):
        right[key], total[key] = right.get(key, 0) + int(hits), total.get(key, 0) + int(n)

    def batches(categories, make):
        gen = SyntheticGenerator(BENCHMARK_SEED, categories=categories, stage=2)
        for start in range(0, args.images, 32):
            samples = [gen.qa_sample(start + j) for j in range(min(32, args.images - start))]
            yield make(processor, samples, recipe.arch)

    with torch.no_grad():
        if (args.run / "stage0-shapes.ckpt").is_file():
            shapes = shape_stage(model, recipe.arch)
            load_checkpoint(args.run / "stage0-shapes.ckpt", shapes)
            shapes.eval()
            for batch in batches(SHAPE_CATEGORIES, shape_batch):
                pred = shapes["shape_head"](shapes["vision"](batch["pixel_values"])).argmax(-1)
                y = batch["patch_shape"]
                on_object = y != len(SHAPES)
                count("stage 0a patch_shape (object patches)", (pred[on_object] == y[on_object]).sum(), on_object.sum())
        if (args.run / "stage0-vision.ckpt").is_file():
            stage0 = vision_stage(model, recipe.arch)
            load_checkpoint(args.run / "stage0-vision.ckpt", stage0)
            stage0.eval()
            for batch in batches(SINGLE_IMAGE_CATEGORIES, vision_batch):
                scene, patch = stage0["heads"](stage0["vision"](batch["pixel_values"]))
                for key, logits in scene.items():
                    y = batch["labels"][key]
                    known = y >= 0
                    count(key, (logits.argmax(-1)[known] == y[known]).sum(), known.sum())
                for key, logits in patch.items():
                    y = batch["patch_labels"][key]
                    on_object = y == 1 if key == "patch_center" else y != logits.shape[-1] - 1  # last class = none
                    count(f"{key} (object patches)", (logits.argmax(-1)[on_object] == y[on_object]).sum(),
                          on_object.sum())
    print("| head | accuracy % | n |\n|---|---:|---:|")
    for key in sorted(total):
        if total[key]:
            print(f"| {key} | {100 * right[key] / total[key]:.1f} | {total[key]} |")


@torch.no_grad()
def patch_map(model, processor, run: Path, image: Path, recipe: RecipeConfig) -> None:
    stage0 = vision_stage(model, recipe.arch)
    load_checkpoint(run / "stage0-vision.ckpt", stage0)
    stage0.eval()
    _, patch = stage0["heads"](stage0["vision"](pixels(processor, [Image.open(image).convert("RGB")])))
    grid = recipe.arch.patch_grid
    shapes, colors = (patch[k][0].argmax(-1).view(grid, grid) for k in ("patch_shape", "patch_color"))
    for row in range(grid):
        cells = [f"{(SHAPES + ('',))[shapes[row, col]][:4]}/{(COLORS + ('',))[colors[row, col]][:3]}"
                 for col in range(grid)]
        print(" ".join(c.ljust(8) if c != "/" else ".".ljust(8) for c in cells))


if __name__ == "__main__":
    main()
