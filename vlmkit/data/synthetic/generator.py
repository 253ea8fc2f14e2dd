"""`SyntheticGenerator` (seeded, random access samples of every category), `scene_labels` and `benchmark_set`;
the categories, answer vocabularies and seeds. See the package docstring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image

from .captions import long_caption
from .qa import QA
from .questions import derived_questions, pick_builder
from .render import FONT_STYLES, render_scene
from .scenes import (
    CHART_KINDS, CHART_LABELS, COLORS, GRID_POSITIONS, POSITIONS, RELATIONS, SCENE_TYPES, SHAPE_PLURALS, SHAPES,
    WORDS, grid_position, sample_aug,
)

TRAIN_SEED_LIMIT = 10_000_000
BENCHMARK_SEED = 10_000_019

CATEGORIES = ("color", "shape", "position", "yesno", "counting", "text", "chart", "two_image", "caption")
SINGLE_IMAGE_CATEGORIES = ("color", "shape", "position", "yesno", "counting", "text", "chart")
BENCHMARK_CATEGORIES = CATEGORIES
DEFAULT_WEIGHTS = {"color": 1.0, "shape": 1.0, "position": 1.2, "yesno": 1.2, "counting": 1.5, "text": 1.5,
                   "chart": 1.5, "two_image": 1.0, "caption": 0.6}
COUNTS = tuple(str(i) for i in range(1, 10))
YESNO = ("yes", "no")
TWO_IMAGE_ANSWERS = ("first", "second", "same", "different", "yes", "no")
BG_TONES = ("white", "light", "dark", "mid", "colored")

# Closed answer vocabularies per category (text, chart and caption answers are open strings).
ANSWERS = {"color": COLORS, "shape": SHAPES, "position": POSITIONS + RELATIONS, "yesno": YESNO,
           "counting": COUNTS, "two_image": TWO_IMAGE_ANSWERS}

# Number of classes of each scene_labels() target (-1 marks "not applicable": use it as ignore_index).
LABEL_CLASSES = {"scene": len(SCENE_TYPES), "count": 13, "color": len(COLORS), "shape": len(SHAPES),
                 "position": len(GRID_POSITIONS), "bg_tone": len(BG_TONES), "text_word": len(WORDS),
                 "text_len": 8, "chart_kind": len(CHART_KINDS), "chart_bars": 6, "chart_argmax": 5,
                 "chart_argmax_label": len(CHART_LABELS),
                 "shape_counts": 13, "color_counts": 13}  # the last two: one count per shape / colour

_SALT = {"qa": 2, "caption": 1, "conversation": 3, "few_shot": 4}
_CAPTION_PROMPTS = ("Describe the image.", "Describe this image in detail.", "What is in this picture?",
                    "Write a caption for this image.", "Give a detailed description of the image.",
                    "What do you see in this image?")


@dataclass
class Sample:
    images: list  # list[PIL.Image.Image], RGB
    question: str  # the (last) user question
    answer: str  # its canonical answer
    category: str
    caption: str | None = None  # detailed caption of the (single) image
    conversation: list | None = None  # chat messages ending with the assistant's answer (multi-turn, few-shot)
    meta: dict = field(default_factory=dict)  # ground truth: scenes (objects, texts, chart), seed, index, ...

    def messages(self, include_answer: bool = True) -> list[dict]:
        """Chat messages (`{"type": "image"}` parts take the images in order)."""
        if self.conversation is not None:
            msgs = self.conversation
        else:
            msgs = [{"role": "user", "content": [{"type": "image"} for _ in self.images]
                     + [{"type": "text", "text": self.question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": self.answer}]}]
        return msgs if include_answer else msgs[:-1]

    def prompt(self) -> str:
        """A plain prompt with `<image>` placeholders (earlier turns inline), without the final answer."""
        parts = []
        for m in self.messages(include_answer=False):
            n_img = sum(p["type"] == "image" for p in m["content"])
            text = "".join(p["text"] for p in m["content"] if p["type"] == "text")
            parts.append("<image>" * n_img + ("\n" if n_img and text else "") + text)
        return "\n".join(parts)


def _render(rng, scene: dict) -> Image.Image:
    if scene["type"] == "text":
        detail = min(t["size"] for t in scene["texts"]) * 0.7
    elif scene["type"] == "chart":
        detail = scene["chart"]["font_scale"] * min(scene["width"], scene["height"]) * 0.7
    else:
        detail = min((o["r"] for o in scene["objects"]), default=20.0) * 1.5
    scene["aug"] = sample_aug(rng, scene, detail)
    return render_scene(scene)


def _user(n_images: int, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class SyntheticGenerator:
    """Seeded, endless, random-access generator of synthetic samples.

    stage=1: `sample(i)` is `caption_sample(i)` (image + detailed caption).
    stage=2: `sample(i)` mixes `qa_sample` (75%), `conversation_sample` (13%) and `few_shot_sample` (12%).
    `categories` restricts the QA categories (default: all of ``CATEGORIES``, weighted by `weights`).
    """

    def __init__(self, seed: int = 0, categories=None, image_size_range=(96, 512), stage: int = 2, weights=None):
        if stage not in (1, 2):
            raise ValueError("stage must be 1 or 2")
        categories = tuple(categories or CATEGORIES)
        unknown = set(categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; choose from {CATEGORIES}")
        lo, hi = image_size_range
        if not 16 <= lo <= hi:
            raise ValueError("image_size_range must be (lo, hi) with 16 <= lo <= hi")
        self.seed, self.stage, self.categories = int(seed), stage, categories
        self.image_size_range = (int(lo), int(hi))
        w = {**DEFAULT_WEIGHTS, **(weights or {})}
        p = np.array([w[c] for c in categories], float)
        self._p = p / p.sum()
        self._single = tuple(c for c in categories if c in SINGLE_IMAGE_CATEGORIES)

    def _rng(self, index: int, kind: str | None = None) -> np.random.Generator:
        key = [self.seed, int(index)] + ([_SALT[kind]] if kind else [])
        return np.random.default_rng(key)

    # -------------------------------------------------------------------------------- random access
    def sample(self, index: int) -> Sample:
        if self.stage == 1:
            return self.caption_sample(index)
        u = self._rng(index).random()
        if self._single and u < 0.13:
            return self.conversation_sample(index)
        if self._single and u < 0.25:
            return self.few_shot_sample(index)
        return self.qa_sample(index)

    __getitem__ = sample

    def __iter__(self) -> Iterator[Sample]:
        return self.stream()

    def stream(self, start: int = 0, step: int = 1) -> Iterator[Sample]:
        """Endless samples start, start+step, ... (e.g. start=rank, step=world_size)."""
        i = start
        while True:
            yield self.sample(i)
            i += step

    def _meta(self, index, kind, qa: QA | None = None, **extra) -> dict:
        meta = {"seed": self.seed, "index": int(index), "kind": kind}
        if qa is not None:
            meta.update(category=qa.category, variant=qa.variant, scenes=qa.scenes)
        meta.update(extra)
        return meta

    def _build(self, rng, category: str, variant: int | None = None) -> tuple[QA, list]:
        _, fn = pick_builder(rng, category, variant)
        qa = fn(rng, self.image_size_range)
        return qa, [_render(rng, s) for s in qa.scenes]

    def qa_sample(self, index: int, category: str | None = None) -> Sample:
        """One question about one image (two for 'two_image'); `category` forces the category."""
        rng = self._rng(index, "qa")
        if category is None:
            category = self.categories[int(rng.choice(len(self.categories), p=self._p))]
        elif category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}")
        qa, images = self._build(rng, category)
        caption = long_caption(rng, qa.scenes[0]) if len(images) == 1 else None
        return Sample(images, qa.question, qa.answer, qa.category, caption, None, self._meta(index, "qa", qa))

    def caption_sample(self, index: int) -> Sample:
        """Stage 1: an image (shapes 65%, text 15%, chart 20%) and its detailed caption."""
        rng = self._rng(index, "caption")
        u = rng.random()
        shapes_cats = ("color", "shape", "counting", "position")
        cat = "text" if u < 0.15 else "chart" if u < 0.35 else shapes_cats[int(rng.integers(4))]
        qa, images = self._build(rng, cat)
        caption = long_caption(rng, qa.scenes[0])
        q = _CAPTION_PROMPTS[int(rng.integers(len(_CAPTION_PROMPTS)))]
        return Sample(images, q, caption, "caption", caption, None,
                      self._meta(index, "caption", qa, category="caption", variant="long"))

    def conversation_sample(self, index: int) -> Sample:
        """2-3 turns about the same image; question/answer/category are those of the last turn."""
        rng = self._rng(index, "conversation")
        pool = self._single or SINGLE_IMAGE_CATEGORIES
        qa, images = self._build(rng, pool[int(rng.integers(len(pool)))])
        turns = [(qa.category, qa.question, qa.answer)]
        extra = [t for t in derived_questions(rng, qa.scenes[0]) if t[1] != qa.question]
        n_more = min(len(extra), int(rng.integers(1, 3)))
        for j in rng.choice(len(extra), n_more, replace=False) if n_more else []:
            turns.append(extra[int(j)])
        msgs = []
        for t, (_, q, a) in enumerate(turns):
            msgs += [_user(1 if t == 0 else 0, q), _assistant(a)]
        cat, q, a = turns[-1]
        return Sample(images, q, a, cat, long_caption(rng, qa.scenes[0]), msgs,
                      self._meta(index, "conversation", qa, category=cat, variant="conversation",
                                 turns=[{"category": c, "question": x, "answer": y} for c, x, y in turns]))

    def few_shot_sample(self, index: int, k: int | None = None) -> Sample:
        """k (1-3) solved examples of one question type, each with its image, then the query image and question
        (k+1 images, as chat messages)."""
        rng = self._rng(index, "few_shot")
        pool = self._single or SINGLE_IMAGE_CATEGORIES
        category = pool[int(rng.integers(len(pool)))]
        k = int(rng.integers(1, 4)) if k is None else int(k)
        variant, _ = pick_builder(rng, category)
        items = [self._build(rng, category, variant) for _ in range(k + 1)]
        msgs, images, scenes = [], [], []
        for qa, imgs in items:
            msgs += [_user(len(imgs), qa.question), _assistant(qa.answer)]
            images += imgs
            scenes += qa.scenes
        last = items[-1][0]
        meta = self._meta(index, "few_shot", last, scenes=scenes, shots=k,
                          turns=[{"question": qa.question, "answer": qa.answer} for qa, _ in items])
        return Sample(images, last.question, last.answer, last.category, None, msgs, meta)


# ---------------------------------------------------------------------------------------------- labels

def scene_labels(sample: Sample, image: int = 0) -> dict:
    """Small-integer classification targets for image `image` of a sample (-1 = not applicable); the
    number of classes of each key is in ``LABEL_CLASSES``. Shapes scenes label their biggest object."""
    scene = sample.meta["scenes"][image]
    lab = {k: -1 for k in LABEL_CLASSES if k not in ("shape_counts", "color_counts")}
    lab["scene"] = SCENE_TYPES.index(scene["type"])
    lab["bg_tone"] = BG_TONES.index(scene["background"]["tone"])
    objs = scene.get("objects") or []
    lab["count"] = min(len(objs), LABEL_CLASSES["count"] - 1) if scene["type"] == "shapes" else -1
    lab["shape_counts"] = [min(12, sum(o["shape"] == s for o in objs)) for s in SHAPES]
    lab["color_counts"] = [min(12, sum(o["color"] == c for o in objs)) for c in COLORS]
    if objs:
        big = max(objs, key=lambda o: o["r"])
        lab["color"], lab["shape"] = COLORS.index(big["color"]), SHAPES.index(big["shape"])
        lab["position"] = GRID_POSITIONS.index(grid_position(big, scene))
    texts = scene.get("texts") or []
    if texts:
        t = texts[0]
        lab["color"] = COLORS.index(t["color"])
        lab["position"] = GRID_POSITIONS.index(grid_position(t, scene))
        lab["text_word"] = WORDS.index(t["text"]) if t["text"] in WORDS else -1
        lab["text_len"] = min(len(t["text"]), LABEL_CLASSES["text_len"] - 1)
    chart = scene.get("chart")
    if chart:
        lab["chart_kind"] = CHART_KINDS.index(chart["kind"])
        lab["chart_bars"] = len(chart["values"])
        lab["chart_argmax"] = int(np.argmax(chart["values"]))
        lab["chart_argmax_label"] = CHART_LABELS.index(chart["labels"][lab["chart_argmax"]])
    return lab


# ------------------------------------------------------------------------------------------- benchmark

def benchmark_set(n: int = 2000, seed: int = BENCHMARK_SEED, categories=BENCHMARK_CATEGORIES,
                  image_size_range=(96, 512)) -> list[Sample]:
    """A fixed evaluation set of n single-turn QA samples, balanced across `categories` (round-robin, so any
    prefix is balanced too). Its seed must be >= TRAIN_SEED_LIMIT: training seeds are all below it."""
    if seed < TRAIN_SEED_LIMIT:
        raise ValueError(f"benchmark seeds must be >= {TRAIN_SEED_LIMIT} (training uses seeds below it)")
    gen = SyntheticGenerator(seed, categories=categories, image_size_range=image_size_range, stage=2)
    return [gen.qa_sample(i, category=categories[i % len(categories)]) for i in range(n)]


__all__ = [
    "Sample", "SyntheticGenerator", "scene_labels", "benchmark_set", "CATEGORIES", "SINGLE_IMAGE_CATEGORIES",
    "BENCHMARK_CATEGORIES", "COLORS", "SHAPES", "SHAPE_PLURALS", "POSITIONS", "RELATIONS", "GRID_POSITIONS",
    "SCENE_TYPES", "CHART_KINDS", "CHART_LABELS", "WORDS", "COUNTS", "YESNO", "TWO_IMAGE_ANSWERS", "BG_TONES",
    "ANSWERS", "LABEL_CLASSES", "FONT_STYLES", "TRAIN_SEED_LIMIT", "BENCHMARK_SEED",
]
