"""What a question builder returns (`QA`) and the small pieces the builders share.

A builder is ``fn(rng, size_range) -> QA``: it builds scene(s) *for* a question, so that the answer is unambiguous
by construction (unique referents, clear margins, no overlaps, contrasting colours).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .scenes import SHAPES, contrasting_colors, make_objects


@dataclass
class QA:
    scenes: list
    question: str
    answer: str
    category: str
    variant: str
    extra: dict = field(default_factory=dict)


def one_of(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def some_of(rng, seq, k):
    seq = list(seq)
    return [seq[i] for i in rng.choice(len(seq), k, replace=False)]


def coin(rng) -> bool:
    return bool(rng.random() < 0.5)


def yes_no(b: bool) -> str:
    return "yes" if b else "no"


def color_word(rng) -> str:
    return "colour" if rng.random() < 0.25 else "color"


def spec(shape, color, r):
    return {"shape": shape, "color": color, "r": r}


def other_specs(rng, cv, n, r, avoid_shapes=(), avoid_colors=(), avoid_pairs=(), scale=(0.6, 1.0)):
    shapes = [s for s in SHAPES if s not in avoid_shapes]
    colors = [c for c in cv.allowed if c not in avoid_colors]
    out = []
    while len(out) < n:
        s, c = one_of(rng, shapes), one_of(rng, colors)
        if (c, s) not in avoid_pairs:
            out.append(spec(s, c, r * rng.uniform(*scale)))
    return out


def name_of(rng, obj, shape_unique=True):
    """A phrase naming obj ('circle' or 'red circle'); callers guarantee uniqueness of the shape."""
    return obj["shape"] if shape_unique and rng.random() < 0.5 else f"{obj['color']} {obj['shape']}"


def shapes_scene(rng, cv, specs, regions=None):
    return cv.scene(objects=make_objects(rng, cv, specs, regions), texts=[], chart=None)


def text_colors(cv):
    """Colours that are easy to read on the canvas background (distinct hue and brightness)."""
    return contrasting_colors(cv.bg, 200.0, 80.0) or contrasting_colors(cv.bg, 150.0, 60.0) or cv.allowed
