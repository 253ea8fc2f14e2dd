"""Can the default recipe's ViT learn shapes on its own? Trains a fresh one on the per-patch shape target alone
(stage 0a's module and loss, at a constant learning rate) for a fixed time and prints held-out accuracy on the
patches that lie on an object (chance: 1 in 8). Used to choose stage 0a's learning rate; compare with
`vision_heads.py` on a recipe run.

    python -m recipes.default_model.probes.shape_probe [--minutes 10] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vlmkit.data.synthetic import BENCHMARK_SEED, SHAPES, SyntheticGenerator
from vlmkit.train.loop import autocast

from ..config import RecipeConfig
from ..model_folder import precision as recipe_precision
from ..model_folder import prepare_folder
from ..vision import SHAPE_CATEGORIES, shape_batch, shape_loss, shape_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    recipe = RecipeConfig()
    model, processor = prepare_folder(Path(tempfile.mkdtemp()), recipe)
    stage = shape_stage(model, recipe.arch)
    opt = torch.optim.AdamW(stage.parameters(), lr=args.lr, weight_decay=0.05)
    precision = recipe_precision()
    test_gen = SyntheticGenerator(BENCHMARK_SEED, categories=SHAPE_CATEGORIES)
    test = shape_batch(processor, [test_gen.qa_sample(i) for i in range(128)], recipe.arch)
    gen = SyntheticGenerator(0, categories=SHAPE_CATEGORIES)
    print("| images | seconds | loss | held-out accuracy on object patches % |\n|---:|---:|---:|---:|")
    start, step = time.time(), 0
    while time.time() - start < args.minutes * 60:
        batch = shape_batch(processor, [gen.qa_sample(step * args.batch_size + j) for j in range(args.batch_size)],
                            recipe.arch)
        with autocast(torch.device("cpu"), precision):
            loss = shape_loss(stage, batch, recipe.shape.background_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            with torch.no_grad(), autocast(torch.device("cpu"), precision):
                pred = stage["shape_head"](stage["vision"](test["pixel_values"])).argmax(-1)
            y = test["patch_shape"]
            on_object = y != len(SHAPES)
            acc = (pred[on_object] == y[on_object]).float().mean() * 100
            row = f"| {step * args.batch_size} | {time.time() - start:.0f} | {loss.item():.3f} | {acc:.1f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
