"""How well did the default recipe's vision stage learn? Held-out accuracy of its stage-0 heads (scene-level heads,
and per-patch heads on the patches that lie on an object), from a run folder's `stage0-vision.ckpt`.

    python bench/default_vision_heads.py runs/default [--images 512]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vlmkit.data.synthetic import BENCHMARK_SEED, SINGLE_IMAGE_CATEGORIES, SyntheticGenerator
from vlmkit.train import default_recipe as recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a `vlmkit train --recipe default --out` folder")
    ap.add_argument("--images", type=int, default=512)
    args = ap.parse_args()
    model, processor = recipe.prepare_folder(Path(tempfile.mkdtemp()))
    heads = recipe.VisionHeads(recipe.VISION.hidden_size * recipe.SHUFFLE**2, recipe.TOKENS_PER_IMAGE,
                               recipe.vision_classes(), recipe.VISION.hidden_size, recipe.patch_classes())
    stage0 = nn.ModuleDict({"vision": model.vision, "heads": heads})
    ckpt = load_file(str(args.run / "stage0-vision.ckpt"))
    stage0.load_state_dict({k[len("param/"):]: v for k, v in ckpt.items() if k.startswith("param/")})
    stage0.eval()
    gen = SyntheticGenerator(BENCHMARK_SEED, categories=SINGLE_IMAGE_CATEGORIES, stage=2)
    right, total = {}, {}

    def count(key, hits, n):
        right[key], total[key] = right.get(key, 0) + int(hits), total.get(key, 0) + int(n)

    with torch.no_grad():
        for start in range(0, args.images, 32):
            samples = [gen.qa_sample(start + j) for j in range(min(32, args.images - start))]
            scene, patch = stage0["heads"](stage0["vision"](recipe.pixels(processor, [s.images[0] for s in samples])))
            labels = [recipe.vision_labels(s) for s in samples]
            for key, logits in scene.items():
                y = torch.tensor([lab.get(key, -1) for lab in labels])
                known = y >= 0
                count(key, (logits.argmax(-1)[known] == y[known]).sum(), known.sum())
            dense = [recipe.patch_labels(s) for s in samples]
            for key, logits in patch.items():
                y = torch.stack([d[key] for d in dense])
                on_object = y == 1 if key == "patch_center" else y != logits.shape[-1] - 1  # last class = none
                count(f"{key} (object patches)", (logits.argmax(-1)[on_object] == y[on_object]).sum(), on_object.sum())
    print("| head | accuracy % | n |\n|---|---:|---:|")
    for key in sorted(total):
        if total[key]:
            print(f"| {key} | {100 * right[key] / total[key]:.1f} | {total[key]} |")


if __name__ == "__main__":
    main()
