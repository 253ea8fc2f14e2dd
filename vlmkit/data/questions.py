"""Question builders: for each category, variants that build scene(s) *for* a question, so that the answer
is unambiguous by construction (unique referents, clear margins, no overlaps, contrasting colours).

A builder is ``fn(rng, size_range) -> QA``; `derived_questions` asks further questions about an existing
scene (for multi-turn conversations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scenes import (
    COLORS, SHAPE_PLURALS, SHAPES, ZONES, Canvas, base_radius, chart_scene, contrasting_colors, make_objects,
    object_rgb, place, random_text, short_caption, text_item, zone_of,
)


@dataclass
class QA:
    scenes: list
    question: str
    answer: str
    category: str
    variant: str
    extra: dict = field(default_factory=dict)


def _c(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _pick(rng, seq, k):
    seq = list(seq)
    return [seq[i] for i in rng.choice(len(seq), k, replace=False)]


def _yes(rng) -> bool:
    return bool(rng.random() < 0.5)


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _color_word(rng) -> str:
    return "colour" if rng.random() < 0.25 else "color"


def _spec(shape, color, r):
    return {"shape": shape, "color": color, "r": r}


def _others(rng, cv, n, r, avoid_shapes=(), avoid_colors=(), avoid_pairs=(), scale=(0.6, 1.0)):
    shapes = [s for s in SHAPES if s not in avoid_shapes]
    colors = [c for c in cv.allowed if c not in avoid_colors]
    out = []
    while len(out) < n:
        s, c = _c(rng, shapes), _c(rng, colors)
        if (c, s) not in avoid_pairs:
            out.append(_spec(s, c, r * rng.uniform(*scale)))
    return out


def _ref(rng, obj, shape_unique=True):
    """A phrase naming obj ('circle' or 'red circle'); callers guarantee uniqueness of the shape."""
    return obj["shape"] if shape_unique and rng.random() < 0.5 else f"{obj['color']} {obj['shape']}"


def _shapes_scene(rng, cv, specs, regions=None):
    return cv.scene(objects=make_objects(rng, cv, specs, regions), texts=[], chart=None)


# ---------------------------------------------------------------------------------------------- colour

def color_unique_shape(rng, size_range):
    cv = Canvas(rng, size_range)
    n_other = int(rng.integers(0, 5))
    r = base_radius(cv, n_other + 1)
    target = _c(rng, SHAPES)
    specs = [_spec(target, _c(rng, cv.allowed), r * rng.uniform(0.7, 1.0))]
    specs += _others(rng, cv, n_other, r, avoid_shapes=(target,))
    scene = _shapes_scene(rng, cv, specs)
    cw = _color_word(rng)
    if n_other == 0 and rng.random() < 0.4:
        q = _c(rng, [f"What {cw} is the shape?", f"What {cw} is this shape?", f"What {cw} is the object in the image?"])
    else:
        q = _c(rng, [f"What {cw} is the {target}?", f"What is the {cw} of the {target}?",
                     f"Which {cw} is the {target}?", f"Tell me the {cw} of the {target}.",
                     f"What {cw} is the {target} in the image?"])
    return QA([scene], q, scene["objects"][0]["color"], "color", "unique_shape")


def _extreme_specs(rng, cv, n, biggest=True):
    r = base_radius(cv, n)
    specs = [_spec(_c(rng, SHAPES), _c(rng, cv.allowed), r * rng.uniform(0.55, 0.75)) for _ in range(n)]
    rs = [s["r"] for s in specs[1:]]
    specs[0]["r"] = max(rs) * rng.uniform(1.45, 1.9) if biggest else min(rs) / rng.uniform(1.45, 1.7)
    return specs


def color_extreme(rng, size_range):
    cv = Canvas(rng, size_range)
    big = rng.random() < 0.65
    scene = _shapes_scene(rng, cv, _extreme_specs(rng, cv, int(rng.integers(2, 6)), big))
    cw, word = _color_word(rng), _c(rng, ["biggest", "largest"] if big else ["smallest"])
    q = _c(rng, [f"What {cw} is the {word} shape?", f"What is the {cw} of the {word} object?",
                 f"What {cw} is the {word} object?"])
    return QA([scene], q, scene["objects"][0]["color"], "color", "biggest" if big else "smallest")


def _text_colors(cv):
    """Colours that are easy to read on the canvas background (distinct hue and brightness)."""
    return contrasting_colors(cv.bg, 200.0, 80.0) or contrasting_colors(cv.bg, 150.0, 60.0) or cv.allowed


def color_text(rng, size_range):
    cv = Canvas(rng, size_range, "text")
    item = text_item(rng, cv, random_text(rng), _c(rng, _text_colors(cv)))
    scene = cv.scene(objects=[], texts=[item], chart=None)
    cw = _color_word(rng)
    q = _c(rng, [f"What {cw} is the text?", f"What {cw} is the writing?", f"In what {cw} is the text written?"])
    return QA([scene], q, item["color"], "color", "text")


# ----------------------------------------------------------------------------------------------- shape

def shape_unique_color(rng, size_range):
    cv = Canvas(rng, size_range)
    n_other = int(rng.integers(0, 5))
    r = base_radius(cv, n_other + 1)
    color = _c(rng, cv.allowed)
    specs = [_spec(_c(rng, SHAPES), color, r * rng.uniform(0.7, 1.0))]
    specs += _others(rng, cv, n_other, r, avoid_colors=(color,))
    scene = _shapes_scene(rng, cv, specs)
    if n_other == 0 and rng.random() < 0.5:
        q = _c(rng, ["What shape is this?", "What shape is shown in the image?", "Name the shape in the picture.",
                     "What shape do you see?"])
    else:
        q = _c(rng, [f"What shape is the {color} object?", f"What is the shape of the {color} object?",
                     f"Which shape is {color}?", f"What shape is {color}?"])
    return QA([scene], q, scene["objects"][0]["shape"], "shape", "unique_color")


def shape_extreme(rng, size_range):
    cv = Canvas(rng, size_range)  # biggest only: the smallest object can be too small to tell its shape
    scene = _shapes_scene(rng, cv, _extreme_specs(rng, cv, int(rng.integers(2, 6)), True))
    word = _c(rng, ["biggest", "largest"])
    q = _c(rng, [f"What shape is the {word}?", f"Which shape is the {word}?", f"What is the {word} shape?"])
    return QA([scene], q, scene["objects"][0]["shape"], "shape", "biggest")


_SIDE_REGIONS = {  # target region, others region
    "left": ((0.0, 0.0, 0.28, 1.0), (0.45, 0.0, 1.0, 1.0)), "right": ((0.72, 0.0, 1.0, 1.0), (0.0, 0.0, 0.55, 1.0)),
    "top": ((0.0, 0.0, 1.0, 0.28), (0.0, 0.45, 1.0, 1.0)), "bottom": ((0.0, 0.72, 1.0, 1.0), (0.0, 0.0, 1.0, 0.55)),
}


def shape_side(rng, size_range):
    cv = Canvas(rng, size_range)
    side = _c(rng, list(_SIDE_REGIONS))
    n = int(rng.integers(2, 5))
    r = base_radius(cv, n + 1)
    specs = [_spec(_c(rng, SHAPES), _c(rng, cv.allowed), r * rng.uniform(0.6, 0.9)) for _ in range(n)]
    tr, orr = _SIDE_REGIONS[side]
    scene = _shapes_scene(rng, cv, specs, [tr] + [orr] * (n - 1))
    word = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}[side]
    q = _c(rng, [f"What is the {word} shape?", f"Which shape is furthest to the {side}?" if side in ("left", "right")
                 else f"Which shape is closest to the {side}?", f"What shape is the {word} object?"])
    return QA([scene], q, scene["objects"][0]["shape"], "shape", "side")


# -------------------------------------------------------------------------------------------- position

def _two_refs(rng, cv, n_other, r):
    sa, sb = _pick(rng, SHAPES, 2)
    specs = [_spec(sa, _c(rng, cv.allowed), r * rng.uniform(0.6, 1.0)),
             _spec(sb, _c(rng, cv.allowed), r * rng.uniform(0.6, 1.0))]
    return specs + _others(rng, cv, n_other, r, avoid_shapes=(sa, sb))


def _relation_scene(rng, cv, relation, n_other):
    """objects[0] is `relation` (left/right/above/below) of objects[1], with a clear gap on that axis."""
    r = base_radius(cv, n_other + 2)
    specs = _two_refs(rng, cv, n_other, r)
    lo, hi = (0.0, 0.42), (0.58, 1.0)
    a, b = (lo, hi) if relation in ("left", "above") else (hi, lo)
    if relation in ("left", "right"):
        regions = [(a[0], 0, a[1], 1), (b[0], 0, b[1], 1)]
    else:
        regions = [(0, a[0], 1, a[1]), (0, b[0], 1, b[1])]
    return _shapes_scene(rng, cv, specs, regions + [None] * n_other)


def position_zone(rng, size_range):
    cv = Canvas(rng, size_range)
    zone = _c(rng, list(ZONES))
    n_other = int(rng.integers(0, 4))
    r = min(base_radius(cv, n_other + 1), 0.17 * cv.min_side)
    target = _c(rng, SHAPES)
    specs = [_spec(target, _c(rng, cv.allowed), r * rng.uniform(0.6, 1.0))]
    specs += _others(rng, cv, n_other, r, avoid_shapes=(target,))
    scene = _shapes_scene(rng, cv, specs, [ZONES[zone]] + [None] * n_other)
    obj = scene["objects"][0]
    ref = "shape" if n_other == 0 and rng.random() < 0.3 else _ref(rng, obj)
    q = _c(rng, [f"Where is the {ref}?", f"Where is the {ref} in the image?",
                 f"In which part of the image is the {ref}?",
                 f"Where is the {ref}: left, right, top, bottom or center?"])
    return QA([scene], q, zone, "position", "zone")


def position_relation(rng, size_range):
    cv = Canvas(rng, size_range)
    horizontal = rng.random() < 0.55
    relation = _c(rng, ["left", "right"] if horizontal else ["above", "below"])
    scene = _relation_scene(rng, cv, relation, int(rng.integers(0, 3)))
    a, b = _ref(rng, scene["objects"][0]), _ref(rng, scene["objects"][1])
    if horizontal:
        q = _c(rng, [f"Is the {a} to the left or to the right of the {b}?", f"Is the {a} left or right of the {b}?",
                     f"On which side of the {b} is the {a}, left or right?"])
    else:
        q = _c(rng, [f"Is the {a} above or below the {b}?", f"Is the {a} above the {b} or below it?"])
    return QA([scene], q, relation, "position", "relation")


# ---------------------------------------------------------------------------------------------- yes/no

def yesno_exists(rng, size_range):
    cv = Canvas(rng, size_range)
    yes = _yes(rng)
    s, c = _c(rng, SHAPES), _c(rng, cv.allowed)
    n = int(rng.integers(1, 6))
    r = base_radius(cv, n)
    specs = _others(rng, cv, n, r, avoid_pairs=((c, s),))
    if yes:
        specs[0] = _spec(s, c, r * rng.uniform(0.6, 1.0))
    elif rng.random() < 0.6:  # hard negative: same shape in another colour, or same colour in another shape
        other_c = [x for x in cv.allowed if x != c]
        other_s = [x for x in SHAPES if x != s]
        specs[0] = _spec(s, _c(rng, other_c), r * 0.8) if rng.random() < 0.5 else _spec(_c(rng, other_s), c, r * 0.8)
    scene = _shapes_scene(rng, cv, specs)
    a = "an" if c[0] in "aeiou" else "a"
    q = _c(rng, [f"Is there {a} {c} {s} in the image?", f"Is there {a} {c} {s}?", f"Do you see {a} {c} {s}?",
                 f"Does the image contain {a} {c} {s}?"])
    return QA([scene], q, _yn(yes), "yesno", "exists")


def yesno_attribute(rng, size_range):
    cv = Canvas(rng, size_range)
    yes = _yes(rng)
    n_other = int(rng.integers(0, 4))
    r = base_radius(cv, n_other + 1)
    s = _c(rng, SHAPES)
    specs = [_spec(s, _c(rng, cv.allowed), r * rng.uniform(0.7, 1.0))]
    specs += _others(rng, cv, n_other, r, avoid_shapes=(s,))
    scene = _shapes_scene(rng, cv, specs)
    true_c = scene["objects"][0]["color"]
    asked = true_c if yes else _c(rng, [x for x in COLORS if x != true_c])
    q = _c(rng, [f"Is the {s} {asked}?", f"Is the {s} {asked} in color?", f"Is the color of the {s} {asked}?"])
    return QA([scene], q, _yn(yes), "yesno", "attribute")


def yesno_count(rng, size_range):
    cv = Canvas(rng, size_range)
    yes = _yes(rng)
    k = int(rng.integers(1, 8))
    s = _c(rng, SHAPES)
    n_other = int(rng.integers(0, 3))
    r = base_radius(cv, k + n_other)
    specs = [_spec(s, _c(rng, cv.allowed), r * rng.uniform(0.7, 1.0)) for _ in range(k)]
    specs += _others(rng, cv, n_other, r, avoid_shapes=(s,))
    scene = _shapes_scene(rng, cv, specs)
    asked = k if yes else max(1, k + _c(rng, [-2, -1, 1, 1, 2])) if k > 1 else _c(rng, [2, 3])
    asked = asked if asked != k or yes else k + 1
    noun = s if asked == 1 else SHAPE_PLURALS[s]
    q = _c(rng, [f"Are there exactly {asked} {noun}?" if asked > 1 else f"Is there exactly {asked} {noun}?",
                 f"Does the image contain exactly {asked} {noun}?"])
    return QA([scene], q, _yn(asked == k), "yesno", "count")


def yesno_relation(rng, size_range):
    cv = Canvas(rng, size_range)
    relation = _c(rng, ["left", "right", "above", "below"])
    scene = _relation_scene(rng, cv, relation, int(rng.integers(0, 3)))
    yes = _yes(rng)
    asked = relation if yes else {"left": "right", "right": "left", "above": "below", "below": "above"}[relation]
    a, b = _ref(rng, scene["objects"][0]), _ref(rng, scene["objects"][1])
    phrase = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[asked]
    return QA([scene], f"Is the {a} {phrase} the {b}?", _yn(yes), "yesno", "relation")


def yesno_bigger(rng, size_range):
    cv = Canvas(rng, size_range)
    n_other = int(rng.integers(0, 3))
    r = base_radius(cv, n_other + 2)
    specs = _two_refs(rng, cv, n_other, r)
    specs[0]["r"], specs[1]["r"] = r, r / rng.uniform(1.5, 2.0)
    if rng.random() < 0.5:
        specs[0], specs[1] = specs[1], specs[0]
    scene = _shapes_scene(rng, cv, specs)
    o0, o1 = scene["objects"][:2]
    word = _c(rng, ["bigger", "larger"]) if rng.random() < 0.7 else "smaller"
    truth = (o0["r"] > o1["r"]) == (word != "smaller")
    return QA([scene], f"Is the {_ref(rng, o0)} {word} than the {_ref(rng, o1)}?", _yn(truth), "yesno", "bigger")


def yesno_text(rng, size_range):
    cv = Canvas(rng, size_range, "text")
    text = random_text(rng, 0.2)
    item = text_item(rng, cv, text, _c(rng, _text_colors(cv)))
    scene = cv.scene(objects=[], texts=[item], chart=None)
    yes = _yes(rng)
    asked = text
    while not yes and asked == text:
        asked = random_text(rng, 1.0 if text.isdigit() else 0.0)
    q = _c(rng, [f'Does the text say "{asked}"?', f'Is the word "{asked}" written in the image?',
                 f'Does the image say "{asked}"?'] if not asked.isdigit() else
           [f"Is the number {asked} written in the image?", f'Does the text say "{asked}"?'])
    return QA([scene], q, _yn(yes), "yesno", "text")


def yesno_chart(rng, size_range):
    cv = Canvas(rng, size_range, "chart")
    scene = chart_scene(rng, cv)
    c = scene["chart"]
    big = int(np.argmax(c["values"]))
    yes = _yes(rng)
    lbl = c["labels"][big] if yes else _c(rng, [x for i, x in enumerate(c["labels"]) if i != big])
    q = _c(rng, [f"Does {lbl} have the largest value?", f"Is {lbl} the largest in the chart?"])
    return QA([scene], q, _yn(yes), "yesno", "chart")


# -------------------------------------------------------------------------------------------- counting

def _count_scene(rng, cv, k, target, n_other, others_kw):
    r = base_radius(cv, k + n_other)
    specs = [_spec(*target(), r * rng.uniform(0.7, 1.0)) for _ in range(k)]
    specs += _others(rng, cv, n_other, r, scale=(0.7, 1.0), **others_kw)
    return _shapes_scene(rng, cv, specs)


def counting_total(rng, size_range):
    cv = Canvas(rng, size_range)
    k = int(rng.integers(1, 10))
    same = rng.random() < 0.4
    s0 = _c(rng, SHAPES)
    scene = _count_scene(rng, cv, k, lambda: (s0 if same else _c(rng, SHAPES), _c(rng, cv.allowed)), 0, {})
    q = _c(rng, ["How many shapes are there?", "How many objects are in the image?", "Count the shapes in the image.",
                 "How many shapes can you see?", "How many objects are there?"])
    return QA([scene], q, str(k), "counting", "total")


def counting_shape(rng, size_range):
    cv = Canvas(rng, size_range)
    k, s = int(rng.integers(1, 10)), _c(rng, SHAPES)
    scene = _count_scene(rng, cv, k, lambda: (s, _c(rng, cv.allowed)), int(rng.integers(0, 4)), {"avoid_shapes": (s,)})
    p = SHAPE_PLURALS[s]
    q = _c(rng, [f"How many {p} are there?", f"How many {p} are in the image?", f"Count the {p}.",
                 f"How many {p} can you see?"])
    return QA([scene], q, str(k), "counting", "shape")


def counting_color(rng, size_range):
    cv = Canvas(rng, size_range)
    k, c = int(rng.integers(1, 10)), _c(rng, cv.allowed)
    scene = _count_scene(rng, cv, k, lambda: (_c(rng, SHAPES), c), int(rng.integers(0, 4)), {"avoid_colors": (c,)})
    q = _c(rng, [f"How many {c} shapes are there?", f"How many {c} objects are in the image?",
                 f"Count the {c} shapes."])
    return QA([scene], q, str(k), "counting", "color")


def counting_pair(rng, size_range):
    cv = Canvas(rng, size_range)
    k, c, s = int(rng.integers(1, 10)), _c(rng, cv.allowed), _c(rng, SHAPES)
    n_other = int(rng.integers(1, 4))
    r = base_radius(cv, k + n_other)
    specs = [_spec(s, c, r * rng.uniform(0.7, 1.0)) for _ in range(k)]
    other_c = [x for x in cv.allowed if x != c]
    other_s = [x for x in SHAPES if x != s]
    for _ in range(n_other):  # distractors share the colour or the shape, never both
        if rng.random() < 0.5:
            specs.append(_spec(s, _c(rng, other_c), r * 0.85))
        else:
            specs.append(_spec(_c(rng, other_s), c, r * 0.85))
    scene = _shapes_scene(rng, cv, specs)
    q = _c(rng, [f"How many {c} {SHAPE_PLURALS[s]} are there?", f"How many {c} {SHAPE_PLURALS[s]} are in the image?"])
    return QA([scene], q, str(k), "counting", "pair")


# ------------------------------------------------------------------------------------------------ text

_READ_WORD = ["What does the text say?", "What word is written in the image?", "What is written in the image?",
              "Read the text in the image.", "What word is shown?", "What is written here?"]
_READ_NUMBER = ["What number is shown?", "What number is written in the image?", "What does the text say?",
                "Read the number in the image.", "What is written here?"]


def text_single(rng, size_range):
    cv = Canvas(rng, size_range, "text")
    text = random_text(rng)
    item = text_item(rng, cv, text, _c(rng, _text_colors(cv)))
    scene = cv.scene(objects=[], texts=[item], chart=None)
    return QA([scene], _c(rng, _READ_NUMBER if text.isdigit() else _READ_WORD), text, "text", "single")


def text_two(rng, size_range):
    cv = Canvas(rng, size_range, "text")
    tall = cv.height >= 0.8 * cv.width
    halves = [(0, 0, 1, 0.5), (0, 0.5, 1, 1)] if tall else [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]
    t1 = random_text(rng, 0.25)
    t2 = t1
    while t2 == t1:
        t2 = random_text(rng, 0.25)
    cols = _text_colors(cv)
    c1, c2 = _pick(rng, cols, 2) if len(cols) > 1 else (cols[0], cols[0])
    items = [text_item(rng, cv, t1, c1, (0.1, 0.2), 0.9, halves[0], 8.0),
             text_item(rng, cv, t2, c2, (0.1, 0.2), 0.9, halves[1], 8.0)]
    scene = cv.scene(objects=[], texts=items, chart=None)
    i = int(rng.integers(2))
    if c1 != c2 and rng.random() < 0.35:
        q = f"What is written in {items[i]['color']}?"
    else:
        where = (("at the top", "at the bottom") if tall else ("on the left", "on the right"))[i]
        q = _c(rng, [f"What is written {where}?", f"What does the text {where} say?"])
    return QA([scene], q, items[i]["text"], "text", "two")


# ----------------------------------------------------------------------------------------------- chart

def chart_question(rng, size_range):
    cv = Canvas(rng, size_range, "chart", tones=(("white", 0.45), ("light", 0.35), ("dark", 0.15), ("colored", 0.05)))
    scene = chart_scene(rng, cv)
    c = scene["chart"]
    u, pie = rng.random(), c["kind"] == "pie"
    if u < 0.55:
        big = u < 0.36
        i = int(np.argmax(c["values"]) if big else np.argmin(c["values"]))
        w = "largest" if big else "smallest"
        if pie:
            q = _c(rng, [f"Which slice is the {w}?", f"Which label has the {w} share?", f"Which category is the {w}?"])
        else:
            tall = ("tallest" if big else "shortest") if c["kind"] == "bar" else ("longest" if big else "shortest")
            hv = "highest" if big else "lowest"
            q = _c(rng, [f"Which bar is the {tall}?", f"Which label has the {hv} value?",
                         f"Which category has the {w} value?"])
        return QA([scene], q, c["labels"][i], "chart", "largest" if big else "smallest")
    i = int(rng.integers(len(c["labels"])))
    lbl = c["labels"][i]
    if pie:
        q = _c(rng, [f"What percentage is {lbl}?", f"What is the share of {lbl} in percent?",
                     f"What is the value of {lbl}?"])
    else:
        q = _c(rng, [f"What is the value of {lbl}?", f"What value does {lbl} have?", f"How much is {lbl}?"])
    return QA([scene], q, str(c["values"][i]), "chart", "value")


# ------------------------------------------------------------------------------------------- two images

def _random_shapes(rng, cv, n, **kw):
    r = base_radius(cv, n)
    return _others(rng, cv, n, r, scale=(0.65, 1.0), **kw)


def two_more(rng, size_range):
    k1, k2 = _pick(rng, range(1, 10), 2)
    by_shape = rng.random() < 0.5
    s = _c(rng, SHAPES)
    scenes = []
    for k in (k1, k2):
        cv = Canvas(rng, size_range)
        if by_shape:
            r = base_radius(cv, k + 2)
            specs = [_spec(s, _c(rng, cv.allowed), r * rng.uniform(0.7, 1.0)) for _ in range(k)]
            specs += _others(rng, cv, int(rng.integers(0, 3)), r, avoid_shapes=(s,))
        else:
            specs = _random_shapes(rng, cv, k)
        scenes.append(_shapes_scene(rng, cv, specs))
    noun = SHAPE_PLURALS[s] if by_shape else _c(rng, ["shapes", "objects"])
    q = _c(rng, [f"Which image has more {noun}, the first or the second?",
                 f"Which of the two images contains more {noun}: the first or the second?",
                 f"Which image has more {noun}? Answer first or second."])
    return QA(scenes, q, "first" if k1 > k2 else "second", "two_image", "more")


def _recolor(rng, cv, obj):
    obj["color"] = _c(rng, [x for x in cv.allowed if x != obj["color"]])
    obj["rgb"] = object_rgb(rng, obj["color"])


def two_same(rng, size_range):
    cv = Canvas(rng, size_range)
    n = int(rng.integers(1, 6))
    a = _shapes_scene(rng, cv, _random_shapes(rng, cv, n))
    b = {**a, "objects": [dict(o) for o in a["objects"]]}
    same = _yes(rng)
    if not same:
        objs = b["objects"]
        i = int(rng.integers(len(objs)))
        change = _c(rng, ["color", "shape", "remove", "add"] if len(objs) > 1 else ["color", "shape", "add"])
        if change == "color":
            _recolor(rng, cv, objs[i])
        elif change == "shape":
            objs[i]["shape"] = _c(rng, [x for x in SHAPES if x != objs[i]["shape"]])
        elif change == "remove":
            objs.pop(i)
        else:
            r = float(np.mean([o["r"] for o in objs]))
            pos = place(rng, cv, [r], fixed=[(o["x"], o["y"], o["r"]) for o in objs])
            if pos is None:  # no room: change a colour instead
                change = "color"
                _recolor(rng, cv, objs[i])
            else:
                s, c = _c(rng, SHAPES), _c(rng, cv.allowed)
                objs.append({**objs[i], "shape": s, "color": c, "rgb": object_rgb(rng, c), "x": round(pos[0][0], 2),
                             "y": round(pos[0][1], 2), "r": round(r, 2)})
        b["change"] = change
    q = _c(rng, ["Are the two images the same or different?", "Are these two images the same or different?",
                 "Do the two images show the same thing? Answer same or different."])
    return QA([a, b], q, "same" if same else "different", "two_image", "same")


def two_yesno(rng, size_range):
    scenes = []
    yes = _yes(rng)
    if rng.random() < 0.5:
        s = _c(rng, SHAPES)
        first = None
        for _ in range(2):
            cv = Canvas(rng, size_range)
            if first is None:
                c = _c(rng, cv.allowed)
                first = c
            elif yes and first in cv.allowed:
                c = first
            else:
                c = _c(rng, [x for x in cv.allowed if x != first])
            n_other = int(rng.integers(0, 3))
            r = base_radius(cv, n_other + 1)
            specs = [_spec(s, c, r * 0.9)] + _others(rng, cv, n_other, r, avoid_shapes=(s,))
            scenes.append(_shapes_scene(rng, cv, specs))
        same = scenes[0]["objects"][0]["color"] == scenes[1]["objects"][0]["color"]
        q = _c(rng, [f"Is the {s} the same color in both images?", f"Does the {s} have the same color in both images?"])
        return QA(scenes, q, _yn(same), "two_image", "same_color")
    k1 = int(rng.integers(1, 8))
    k2 = k1 if yes else _c(rng, [k for k in range(1, 9) if k != k1])
    for k in (k1, k2):
        cv = Canvas(rng, size_range)
        scenes.append(_shapes_scene(rng, cv, _random_shapes(rng, cv, k)))
    q = _c(rng, ["Do both images have the same number of shapes?",
                 "Do the two images contain the same number of objects?"])
    return QA(scenes, q, _yn(k1 == k2), "two_image", "same_count")


# --------------------------------------------------------------------------------------------- caption

_SHORT_CAPTION_Q = ["Describe the image in a few words.", "Give a short caption for this image.",
                    "What does the image show? Answer briefly.", "Caption this image briefly."]


def caption_short(rng, size_range):
    u = rng.random()
    if u < 0.15:
        cv = Canvas(rng, size_range, "text")
        item = text_item(rng, cv, random_text(rng), _c(rng, _text_colors(cv)))
        scene = cv.scene(objects=[], texts=[item], chart=None)
    elif u < 0.3:
        cv = Canvas(rng, size_range, "chart")
        scene = chart_scene(rng, cv)
    else:
        cv = Canvas(rng, size_range)
        two = rng.random() < 0.5
        n1 = int(rng.integers(1, 5 if two else 7))
        s1, c1 = _c(rng, SHAPES), _c(rng, cv.allowed)
        groups = [(s1, c1, n1)]
        if two:
            s2, c2 = _c(rng, SHAPES), _c(rng, cv.allowed)
            while (s2, c2) == (s1, c1):
                s2, c2 = _c(rng, SHAPES), _c(rng, cv.allowed)
            groups.append((s2, c2, int(rng.integers(1, 4))))
        n = sum(g[2] for g in groups)
        r = base_radius(cv, n)
        specs, regions = [], []
        for gi, (s, c, k) in enumerate(groups):
            specs += [_spec(s, c, r * rng.uniform(0.7, 1.0)) for _ in range(k)]
            regions += [None if not two else (0, 0, 0.45, 1) if gi == 0 else (0.55, 0, 1, 1)] * k
        scene = _shapes_scene(rng, cv, specs, regions)
    return QA([scene], _c(rng, _SHORT_CAPTION_Q), short_caption(scene), "caption", "short")


# ----------------------------------------------------------------------------------------- the registry

# category -> [(weight, builder)]
BUILDERS = {
    "color": [(0.6, color_unique_shape), (0.25, color_extreme), (0.15, color_text)],
    "shape": [(0.55, shape_unique_color), (0.25, shape_extreme), (0.2, shape_side)],
    "position": [(0.45, position_zone), (0.55, position_relation)],
    "yesno": [(0.25, yesno_exists), (0.17, yesno_attribute), (0.13, yesno_count), (0.17, yesno_relation),
              (0.08, yesno_bigger), (0.12, yesno_text), (0.08, yesno_chart)],
    "counting": [(0.35, counting_total), (0.3, counting_shape), (0.2, counting_color), (0.15, counting_pair)],
    "text": [(0.7, text_single), (0.3, text_two)],
    "chart": [(1.0, chart_question)],
    "two_image": [(0.45, two_more), (0.35, two_same), (0.2, two_yesno)],
    "caption": [(1.0, caption_short)],
}


def pick_builder(rng, category: str, variant: int | None = None):
    options = BUILDERS[category]
    if variant is None:
        w = np.array([o[0] for o in options], float)
        variant = int(rng.choice(len(options), p=w / w.sum()))
    return variant, options[variant][1]


# ------------------------------------------------------------------------------ questions about a scene

def derived_questions(rng, scene: dict) -> list[tuple[str, str, str]]:
    """(category, question, answer) triples answerable unambiguously from an existing scene."""
    out = []
    if scene["type"] == "text":
        if len(scene["texts"]) == 1:
            t = scene["texts"][0]
            out.append(("text", _c(rng, _READ_NUMBER if t["text"].isdigit() else _READ_WORD), t["text"]))
            out.append(("color", f"What {_color_word(rng)} is the text?", t["color"]))
            other = random_text(rng, 0.0)
            asked = t["text"] if _yes(rng) or other == t["text"] else other
            out.append(("yesno", f'Does the text say "{asked}"?', _yn(asked == t["text"])))
        return out
    if scene["type"] == "chart":
        c = scene["chart"]
        v = c["values"]
        out.append(("chart", "Which label has the largest value?", c["labels"][int(np.argmax(v))]))
        out.append(("chart", "Which label has the smallest value?", c["labels"][int(np.argmin(v))]))
        i = int(rng.integers(len(v)))
        out.append(("chart", f"What is the value of {c['labels'][i]}?", str(v[i])))
        out.append(("counting", "How many slices are there?" if c["kind"] == "pie" else "How many bars are there?",
                    str(len(v))))
        return out
    objs = scene["objects"]
    n = len(objs)
    if n <= 9:
        out.append(("counting", "How many shapes are there?", str(n)))
    shape_n = {s: sum(o["shape"] == s for o in objs) for s in SHAPES}
    color_n = {c: sum(o["color"] == c for o in objs) for c in COLORS}
    present = [s for s in SHAPES if 0 < shape_n[s] <= 9]
    if present:
        s = _c(rng, present)
        out.append(("counting", f"How many {SHAPE_PLURALS[s]} are there?", str(shape_n[s])))
    for o in objs:
        if shape_n[o["shape"]] == 1:
            out.append(("color", f"What {_color_word(rng)} is the {o['shape']}?", o["color"]))
            z = zone_of(o, scene)
            if z is not None:
                out.append(("position", f"Where is the {o['color']} {o['shape']}?", z))
            break
    for o in objs:
        if color_n[o["color"]] == 1:
            out.append(("shape", f"What shape is the {o['color']} object?", o["shape"]))
            break
    rs = sorted((o["r"] for o in objs), reverse=True)
    if n >= 2 and rs[0] >= 1.35 * rs[1]:
        big = max(objs, key=lambda o: o["r"])
        out.append(("color", f"What {_color_word(rng)} is the biggest shape?", big["color"]))
        out.append(("shape", "What shape is the biggest?", big["shape"]))
    o = _c(rng, objs)
    if _yes(rng):
        c, s = o["color"], o["shape"]
    else:
        c, s = _c(rng, COLORS), _c(rng, SHAPES)
    present_pair = any(p["color"] == c and p["shape"] == s for p in objs)
    out.append(("yesno", f"Is there {'an' if c[0] in 'aeiou' else 'a'} {c} {s}?", _yn(present_pair)))
    return out


__all__ = ["QA", "BUILDERS", "pick_builder", "derived_questions"]
