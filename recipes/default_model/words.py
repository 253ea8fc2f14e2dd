"""Stage 0c: teach the ViT + connector to write image tokens the frozen SmolLM2 can already read -- the sum of the
token embeddings of the words naming what lies in each token's cell ("red" + "circle" in the cell of the red
circle, "." in empty cells).

Why: learning to *find* "the circle" among 16 arbitrary vectors is what the language stage alone failed to learn
in 32k question/answer pairs. With tokens that look like text the LoRA learns the binding an order of magnitude
faster (`probes/oracle_tokens.py`), and the regression itself needs no language model in the loop, so it runs at
the ViT's speed. The squared error alone gets shapes wrong (the shape word right in ~40 % of object cells); the
closest-word classification term (`WordTargets.class_loss`) takes that to ~94 % (`probes/word_tokens.py`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.synthetic import CATEGORIES, COLORS, SHAPES, SyntheticGenerator
from vlmkit.train.loop import run

from .config import RecipeConfig, WordStage
from .model_folder import pixels, precision

EMPTY_WORD = "."  # an empty cell: a fraction of the embedding of "." (a word the LM reads as nothing)
TEXT_WORD = "text"  # a cell covered by rendered text: its colour + "text" ("What colour is the text?")
POSITIONS = ("left", "right", "top", "bottom", "center")  # the answers of "Where is the star?"
EXTREMES = ("biggest", "smallest")  # "What colour is the biggest shape?"


def position_words(fx: float, fy: float) -> tuple[str, ...]:
    """Where a centre at (fx, fy) (fractions of width and height) lies, in the words of the position answers:
    left / right outside the middle third of the width, top / bottom outside the middle third of the height,
    "center" when neither (a corner gets two words). Every zone of the position questions gets its own word."""
    words = (("left",) if fx < 1 / 3 else ("right",) if fx > 2 / 3 else ())
    words += (("top",) if fy < 1 / 3 else ("bottom",) if fy > 2 / 3 else ())
    return words or ("center",)


def extremes(objects: list, size_margin: float) -> dict:
    """{word of EXTREMES: index of the object it names} for the objects clearly the biggest or the smallest of
    their image (a radius over `size_margin` times every other's, or under every other's divided by it; none with
    fewer than two objects): what the colour and shape questions about "the biggest object" ask for, which the LM
    did not learn to tell by comparing tokens. Not "leftmost" and the like: the position words tell those apart."""
    if len(objects) < 2:
        return {}
    found, margin = {}, math.log(size_margin)
    for word, sign in zip(EXTREMES, (1, -1)):
        values = [sign * math.log(o["r"]) for o in objects]
        best = max(range(len(values)), key=values.__getitem__)
        if all(values[best] > v + margin for i, v in enumerate(values) if i != best):
            found[word] = best
    return found


class WordTargets:
    """Per-cell target vectors for the image tokens of a `grid` x `grid` token layout (raster order), with the
    parameters of `params`. Its `position_scale` > 0 adds, in each object's cell, that much of the embeddings of
    its `position_words`: a token then says where its object is, which the LM cannot easily tell from the token's
    place in the sequence. Its `extreme_scale` > 0 likewise adds the words of `extremes` ("biggest", "smallest")
    to the cells of the objects they name."""

    def __init__(self, embed: torch.Tensor, tokenizer, grid: int, params: WordStage):
        self.embed, self.tok, self.grid = embed.detach().float(), tokenizer, grid
        self.params = params
        self.position_scale, self.extreme_scale = params.position_scale, params.extreme_scale
        self.cache: dict = {}

    @classmethod
    def of(cls, model, processor, cfg: RecipeConfig) -> "WordTargets":
        """The targets of the recipe's token layout in its LM's embedding space."""
        return cls(model.text.embed_tokens.weight, processor.tokenizer, cfg.arch.token_grid, cfg.word)

    def word(self, word: str) -> torch.Tensor:
        if word not in self.cache:
            ids = self.tok.encode(" " + word, add_special_tokens=False)
            self.cache[word] = self.embed[ids].sum(0)
        return self.cache[word]

    def vocab(self, words: tuple) -> torch.Tensor:
        """[len(words), dim] embeddings of a closed vocabulary (COLORS, SHAPES), rows in its order."""
        if words not in self.cache:
            self.cache[words] = torch.stack([self.word(w) for w in words])
        return self.cache[words]

    def empty(self) -> torch.Tensor:
        """The target of an empty cell."""
        return self.word(EMPTY_WORD).mul(self.params.empty_scale)

    def cell(self, x: float, y: float, scene: dict) -> int:
        g = self.grid
        return min(g - 1, int(y / scene["height"] * g)) * g + min(g - 1, int(x / scene["width"] * g))

    @staticmethod
    def where(obj: dict, scene: dict) -> tuple[str, ...]:
        return position_words(obj["x"] / scene["width"], obj["y"] / scene["height"])

    def __call__(self, scene: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets [grid^2, dim], weights [grid^2]) of one scene (the ground truth of one image)."""
        n = self.grid**2
        targets = self.empty().repeat(n, 1)
        filled = torch.zeros(n, dtype=torch.bool)
        for o in scene.get("objects") or []:
            i = self.cell(o["x"], o["y"], scene)
            vec = self.word(o["color"]) + self.word(o["shape"])
            if self.position_scale:
                vec = vec + self.position_scale * sum(self.word(w) for w in self.where(o, scene))
            targets[i] = targets[i] + vec if filled[i] else vec  # two objects in one cell: both words
            filled[i] = True
        for w, i in zip(EXTREMES, self.extreme_cells(scene).tolist()):
            if i >= 0:
                targets[i] = targets[i] + self.extreme_scale * self.word(w)
        for t in scene.get("texts") or []:
            i = self.cell(t["x"], t["y"], scene)
            targets[i] = self.word(t["color"]) + self.word(TEXT_WORD)
            filled[i] = True
        weights = torch.where(filled, self.params.object_weight, self.params.empty_weight)
        return targets, weights

    def extreme_cells(self, scene: dict) -> torch.Tensor:
        """[len(EXTREMES)] the cell of the object each extreme word names (-1: none, or no `extreme_scale`)."""
        cells = torch.full((len(EXTREMES),), -1, dtype=torch.long)
        objects = scene.get("objects") or []
        for w, k in (extremes(objects, self.params.size_margin) if self.extreme_scale else {}).items():
            cells[EXTREMES.index(w)] = self.cell(objects[k]["x"], objects[k]["y"], scene)
        return cells

    def classes(self, scene: dict) -> torch.Tensor:
        """[3, grid^2] colour, shape and position ids of the object in each cell that holds exactly one (-1
        elsewhere; position ids only with `position_scale` and for objects with one position word)."""
        labels = torch.full((3, self.grid**2), -1, dtype=torch.long)
        objects = scene.get("objects") or []
        cells = [self.cell(o["x"], o["y"], scene) for o in objects]
        for o, i in zip(objects, cells):
            if cells.count(i) == 1:
                labels[0, i], labels[1, i] = COLORS.index(o["color"]), SHAPES.index(o["shape"])
                where = self.where(o, scene) if self.position_scale else ()
                if len(where) == 1:
                    labels[2, i] = POSITIONS.index(where[0])
        return labels

    def batch(self, scenes: list) -> dict:
        """Targets, weights, single-object classes and extreme cells of several images, stacked."""
        pairs = [self(scene) for scene in scenes]
        return {"word_targets": torch.stack([p[0] for p in pairs]), "word_weights": torch.stack([p[1] for p in pairs]),
                "word_classes": torch.stack([self.classes(scene) for scene in scenes]),
                "word_extremes": torch.stack([self.extreme_cells(scene) for scene in scenes])}

    def class_loss(self, features: torch.Tensor, labels: torch.Tensor,
                   extreme_cells: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of each token's dot products with the colour words' and the shape words' embeddings (and
        the position words', where `classes` gave positions): the closest colour and shape word should be the
        object's. The squared error alone left the shape word right in only ~40 % of object cells (a small part of
        the summed target); with this term, 92 %. With `extreme_cells` (from `extreme_cells`), also, per image and
        extreme word, a cross-entropy over its cells: the word's embedding should pick the named object's token
        out of the 16, as the LM's attention has to when asked about "the biggest shape"."""
        feats = features.float().flatten(0, 1)
        terms = []
        for k, vocab in enumerate((COLORS, SHAPES, POSITIONS)):
            emb = self.vocab(vocab).to(feats.device)
            y = labels[:, k].flatten()
            if (y >= 0).any():
                terms.append(F.cross_entropy(feats @ emb.T, y, ignore_index=-1))
        if extreme_cells is not None and (extreme_cells >= 0).any():
            emb = self.vocab(EXTREMES).to(feats.device)
            scores = features.float() @ emb.T  # [images, cells, words]
            terms.append(F.cross_entropy(scores, extreme_cells.to(feats.device), ignore_index=-1))
        return torch.stack(terms).mean() if terms else feats.sum() * 0


def word_loss(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error per token, divided by the targets' (unweighted) mean square, so its scale does
    not depend on the embedding's; zero tokens score about 2 (object cells have the larger targets and weights)."""
    err = (features.float() - targets).pow(2).mean(-1)
    return (err * weights).sum() / weights.sum() / targets.pow(2).mean()


def word_terms(features: torch.Tensor, batch: dict, targets: WordTargets | None = None,
               class_weight: float = 0.0) -> torch.Tensor:
    """Stage 0c's loss on image tokens: `word_loss` against the batch's targets, plus `class_weight` times
    `targets.class_loss` (given `targets`). Stage 0c trains on it alone; stage 1 keeps it as an auxiliary term."""
    loss = word_loss(features, batch["word_targets"], batch["word_weights"])
    if targets is not None and class_weight:
        loss = loss + class_weight * targets.class_loss(features, batch["word_classes"], batch.get("word_extremes"))
    return loss


def word_batch(processor, targets: WordTargets, samples: list) -> dict:
    images = [im for s in samples for im in s.images]
    scenes = [scene for s in samples for scene in s.meta["scenes"]]
    return {"pixel_values": pixels(processor, images), **targets.batch(scenes)}


def train_words(model, processor, out: Path, cfg: RecipeConfig, from_zero: bool = True) -> list:
    """Stage 0c: ViT + connector regress the word targets of every image, on the single-image and two-image
    categories (charts and text included: their cells are mostly empty, text cells say the text's colour), with
    the classification term at `cfg.word.class_weight`. `from_zero=False` keeps the connector as it is
    (continuing an earlier default model)."""
    stage = cfg.word
    targets = WordTargets.of(model, processor, cfg)
    gen = SyntheticGenerator(stage.seed, categories=tuple(c for c in CATEGORIES if c != "caption"), stage=2)
    trained = nn.ModuleDict({"vision": model.vision, "connector": model.connector})
    if from_zero:  # zero tokens to start with, not a random projection's ~10x larger ones (a resume
        with torch.no_grad():  # overwrites this with the checkpoint's weights)
            model.connector.proj.weight.zero_()

    def make_batch(step):
        samples = [gen.qa_sample(step * stage.batch_size + j) for j in range(stage.batch_size)]
        return word_batch(processor, targets, samples)

    def loss_fn(m, batch):
        feats = model.encode_images(batch["pixel_values"])  # m's modules, through the model's own path
        return word_terms(feats, batch, targets, stage.class_weight)

    return run(trained, make_batch, loss_fn, stage.train_config(precision()), ckpt_path=out / "stage0-words.ckpt",
               label="words")
