"""Do the default model's image tokens say the right words? For held-out images, the colour word and the shape word
whose embeddings are closest to each image token, scored on the cells that hold exactly one object, the closest
position word (left, right, top, bottom, center) on those whose object has one, whether the token most like
"biggest" / "smallest" is that of the object clearly so (images with one), and whether empty cells stay empty
(closer to stage 0c's empty target than to any object's words).

    python -m recipes.default_model.probes.word_tokens runs/default/stage0-words.ckpt  # right after stage 0c
    python -m recipes.default_model.probes.word_tokens vlmkit/weights/default  # an adapter folder (after stage 1)
    python -m recipes.default_model.probes.word_tokens default --image examples/shapes.png  # each cell's words
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

from vlmkit.data.synthetic import BENCHMARK_SEED, COLORS, SHAPES, SyntheticGenerator
from vlmkit.train.loop import load_checkpoint

from ..config import LanguageStage, RecipeConfig
from ..model_folder import pixels, prepare_folder
from ..words import EXTREMES, POSITIONS, WordTargets

CATEGORIES = ("color", "shape", "position", "yesno", "counting")


def load(source: str):
    if source.endswith(".ckpt"):
        model, processor = prepare_folder(Path(tempfile.mkdtemp()), RecipeConfig(language=LanguageStage(lora=False)))
        load_checkpoint(Path(source), torch.nn.ModuleDict({"vision": model.vision, "connector": model.connector}))
        return model, processor
    import vlmkit

    m = vlmkit.load(source)
    return m.model, m.processor


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a stage0-words.ckpt, an adapter folder, or 'default'")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--image", type=Path, help="instead: print the closest words of every cell of this image")
    args = ap.parse_args()
    model, processor = load(args.source)
    model.eval()
    words = WordTargets.of(model, processor, RecipeConfig())
    grid, colors, shapes, places = words.grid, words.vocab(COLORS), words.vocab(SHAPES), words.vocab(POSITIONS)
    empty = words.empty()

    def describe(tokens):  # closest colour, shape and position word of each token, and its distance to empty
        return ((tokens @ colors.T).argmax(-1), (tokens @ shapes.T).argmax(-1), (tokens @ places.T).argmax(-1),
                (tokens - empty).norm(dim=-1))

    if args.image:
        feats = model.encode_images(pixels(processor, [Image.open(args.image).convert("RGB")]))[0]
        c, s, p, d = describe(feats)
        for r in range(grid):
            cells = range(r * grid, (r + 1) * grid)
            print("  ".join(f"{COLORS[c[i]]:>7} {SHAPES[s[i]]:<8} {POSITIONS[p[i]]:<6} ({d[i]:.1f})" for i in cells))
        print(f"(in brackets: distance to the empty token; a colour word's embedding has norm {colors[0].norm():.1f})")
        return
    gen = SyntheticGenerator(BENCHMARK_SEED + 7, categories=CATEGORIES, stage=2)
    hits = {"colour": [0, 0], "shape": [0, 0], "position": [0, 0], "empty stays empty": [0, 0],
            "object not empty": [0, 0], **{w: [0, 0] for w in EXTREMES}}
    for start in range(0, args.images, 32):
        samples = [gen.qa_sample(start + j) for j in range(min(32, args.images - start))]
        feats = model.encode_images(pixels(processor, [s.images[0] for s in samples]))
        for sample, tokens in zip(samples, feats):
            scene = sample.meta["scenes"][0]
            c, s, p, d = describe(tokens)
            occupied = {words.cell(o["x"], o["y"], scene) for o in scene["objects"]}
            labels = words.classes(scene)  # colour, shape, position ids of the cells that hold exactly one object
            d_obj = (tokens - words(scene)[0]).norm(dim=-1)
            for i in range(grid * grid):
                if i not in occupied:
                    hits["empty stays empty"][0] += int(d[i] < (tokens[i] - colors.mean(0) - shapes.mean(0)).norm())
                    hits["empty stays empty"][1] += 1
                elif labels[0, i] >= 0:
                    hits["colour"][0] += int(c[i] == labels[0, i])
                    hits["shape"][0] += int(s[i] == labels[1, i])
                    hits["object not empty"][0] += int(d_obj[i] < d[i])
                    for k in ("colour", "shape", "object not empty"):
                        hits[k][1] += 1
                    if labels[2, i] >= 0:
                        hits["position"][0] += int(p[i] == labels[2, i])
                        hits["position"][1] += 1
            named = (tokens @ words.vocab(EXTREMES).T).argmax(0)  # the cell most like each extreme word
            for k, cell in enumerate(words.extreme_cells(scene).tolist()):
                if cell >= 0:
                    hits[EXTREMES[k]][0] += int(named[k] == cell)
                    hits[EXTREMES[k]][1] += 1
    print(f"| {args.source} | cells | right |\n|---|---:|---:|")
    for k, (right, n) in hits.items():
        print(f"| {k} | {n} | {100 * right / max(1, n):.1f} % |")


if __name__ == "__main__":
    main()
