"""Can the default recipe's ViT learn shapes on its own? Trains a fresh one on the per-patch shape target alone
(`default_recipe.patch_labels`) for a fixed time and prints held-out accuracy on the patches that lie on an object
(chance: 1 in 8). Compare with `default_vision_heads.py` on a recipe run (all of stage 0's heads at once).

    python bench/default_shape_probe.py [--minutes 10] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.synthetic import BENCHMARK_SEED, SHAPES, SyntheticGenerator
from vlmkit.train import default_recipe as recipe
from vlmkit.train.loop import autocast

CATEGORIES = ("shape", "counting", "color")  # shapes scenes only


def batch(processor, gen, first: int, n: int):
    b = recipe.vision_batch(processor, [gen.qa_sample(first + j) for j in range(n)])
    return b["pixel_values"], b["patch_labels"]["patch_shape"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, processor = recipe.prepare_folder(Path(tempfile.mkdtemp()))
    vit, head = model.vision, nn.Linear(recipe.VISION.hidden_size, len(SHAPES) + 1)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    background = len(SHAPES)
    weight = torch.ones(len(SHAPES) + 1)
    weight[background] = 0.1  # most patches are background
    precision = recipe.precision()
    test_pixels, test_labels = batch(processor, SyntheticGenerator(BENCHMARK_SEED, categories=CATEGORIES), 0, 128)
    gen = SyntheticGenerator(0, categories=CATEGORIES)
    print("| images | seconds | loss | held-out accuracy on object patches % |\n|---:|---:|---:|---:|")
    start, step = time.time(), 0
    while time.time() - start < args.minutes * 60:
        pixels, labels = batch(processor, gen, step * args.batch_size, args.batch_size)
        with autocast(torch.device("cpu"), precision):
            logits = head(vit(pixels))
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), weight=weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            with torch.no_grad(), autocast(torch.device("cpu"), precision):
                pred = head(vit(test_pixels)).argmax(-1)
            on_object = test_labels != background
            acc = (pred[on_object] == test_labels[on_object]).float().mean() * 100
            print(f"| {step * args.batch_size} | {time.time() - start:.0f} | {loss.item():.3f} | {acc:.1f} |", flush=True)


if __name__ == "__main__":
    main()
