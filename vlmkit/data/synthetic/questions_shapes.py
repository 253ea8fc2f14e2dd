"""Question builders about shape scenes: colour, shape, position, yes/no and counting questions."""

from __future__ import annotations

import numpy as np

from .qa import QA, coin, color_word, name_of, one_of, other_specs, shapes_scene, some_of, spec, text_colors, yes_no
from .scenes import COLORS, SHAPES, SHAPE_PLURALS, ZONES, Canvas, base_radius, chart_scene, random_text, text_item


# ---------------------------------------------------------------------------------------------- colour

def unique_shape_scene(rng, cv, n_other: int) -> tuple[str, dict]:
    """A shape (the first object, of any colour) and `n_other` objects of other shapes: (its shape, the scene)."""
    r = base_radius(cv, n_other + 1)
    target = one_of(rng, SHAPES)
    specs = [spec(target, one_of(rng, cv.allowed), r * rng.uniform(0.7, 1.0))]
    specs += other_specs(rng, cv, n_other, r, avoid_shapes=(target,))
    return target, shapes_scene(rng, cv, specs)


def color_unique_shape(rng, size_range):
    cv = Canvas(rng, size_range)
    n_other = int(rng.integers(0, 5))
    target, scene = unique_shape_scene(rng, cv, n_other)
    cw = color_word(rng)
    if n_other == 0 and rng.random() < 0.4:
        q = one_of(rng, [f"What {cw} is the shape?", f"What {cw} is this shape?",
                         f"What {cw} is the object in the image?"])
    else:
        q = one_of(rng, [f"What {cw} is the {target}?", f"What is the {cw} of the {target}?",
                     f"Which {cw} is the {target}?", f"Tell me the {cw} of the {target}.",
                     f"What {cw} is the {target} in the image?"])
    return QA([scene], q, scene["objects"][0]["color"], "color", "unique_shape")


def _extreme_specs(rng, cv, n, biggest=True):
    r = base_radius(cv, n)
    specs = [spec(one_of(rng, SHAPES), one_of(rng, cv.allowed), r * rng.uniform(0.55, 0.75)) for _ in range(n)]
    rs = [s["r"] for s in specs[1:]]
    specs[0]["r"] = max(rs) * rng.uniform(1.45, 1.9) if biggest else min(rs) / rng.uniform(1.45, 1.7)
    return specs


def color_extreme(rng, size_range):
    cv = Canvas(rng, size_range)
    big = rng.random() < 0.65
    scene = shapes_scene(rng, cv, _extreme_specs(rng, cv, int(rng.integers(2, 6)), big))
    cw, word = color_word(rng), one_of(rng, ["biggest", "largest"] if big else ["smallest"])
    q = one_of(rng, [f"What {cw} is the {word} shape?", f"What is the {cw} of the {word} object?",
                 f"What {cw} is the {word} object?"])
    return QA([scene], q, scene["objects"][0]["color"], "color", "biggest" if big else "smallest")


def color_text(rng, size_range):
    cv = Canvas(rng, size_range, "text")
    item = text_item(rng, cv, random_text(rng), one_of(rng, text_colors(cv)))
    scene = cv.scene(objects=[], texts=[item], chart=None)
    cw = color_word(rng)
    q = one_of(rng, [f"What {cw} is the text?", f"What {cw} is the writing?", f"In what {cw} is the text written?"])
    return QA([scene], q, item["color"], "color", "text")


# ----------------------------------------------------------------------------------------------- shape

def shape_unique_color(rng, size_range):
    cv = Canvas(rng, size_range)
    n_other = int(rng.integers(0, 5))
    r = base_radius(cv, n_other + 1)
    color = one_of(rng, cv.allowed)
    specs = [spec(one_of(rng, SHAPES), color, r * rng.uniform(0.7, 1.0))]
    specs += other_specs(rng, cv, n_other, r, avoid_colors=(color,))
    scene = shapes_scene(rng, cv, specs)
    if n_other == 0 and rng.random() < 0.5:
        q = one_of(rng, ["What shape is this?", "What shape is shown in the image?", "Name the shape in the picture.",
                     "What shape do you see?"])
    else:
        q = one_of(rng, [f"What shape is the {color} object?", f"What is the shape of the {color} object?",
                     f"Which shape is {color}?", f"What shape is {color}?"])
    return QA([scene], q, scene["objects"][0]["shape"], "shape", "unique_color")


def shape_extreme(rng, size_range):
    cv = Canvas(rng, size_range)  # biggest only: the smallest object can be too small to tell its shape
    scene = shapes_scene(rng, cv, _extreme_specs(rng, cv, int(rng.integers(2, 6)), True))
    word = one_of(rng, ["biggest", "largest"])
    q = one_of(rng, [f"What shape is the {word}?", f"Which shape is the {word}?", f"What is the {word} shape?"])
    return QA([scene], q, scene["objects"][0]["shape"], "shape", "biggest")


_SIDE_REGIONS = {  # target region, others region
    "left": ((0.0, 0.0, 0.28, 1.0), (0.45, 0.0, 1.0, 1.0)), "right": ((0.72, 0.0, 1.0, 1.0), (0.0, 0.0, 0.55, 1.0)),
    "top": ((0.0, 0.0, 1.0, 0.28), (0.0, 0.45, 1.0, 1.0)), "bottom": ((0.0, 0.72, 1.0, 1.0), (0.0, 0.0, 1.0, 0.55)),
}


def shape_side(rng, size_range):
    cv = Canvas(rng, size_range)
    side = one_of(rng, list(_SIDE_REGIONS))
    n = int(rng.integers(2, 5))
    r = base_radius(cv, n + 1)
    specs = [spec(one_of(rng, SHAPES), one_of(rng, cv.allowed), r * rng.uniform(0.6, 0.9)) for _ in range(n)]
    tr, orr = _SIDE_REGIONS[side]
    scene = shapes_scene(rng, cv, specs, [tr] + [orr] * (n - 1))
    word = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}[side]
    q = one_of(rng, [f"What is the {word} shape?", f"Which shape is furthest to the {side}?" if side in ("left",
                     "right")
                 else f"Which shape is closest to the {side}?", f"What shape is the {word} object?"])
    return QA([scene], q, scene["objects"][0]["shape"], "shape", "side")


# -------------------------------------------------------------------------------------------- position

def _two_refs(rng, cv, n_other, r):
    sa, sb = some_of(rng, SHAPES, 2)
    specs = [spec(sa, one_of(rng, cv.allowed), r * rng.uniform(0.6, 1.0)),
             spec(sb, one_of(rng, cv.allowed), r * rng.uniform(0.6, 1.0))]
    return specs + other_specs(rng, cv, n_other, r, avoid_shapes=(sa, sb))


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
    return shapes_scene(rng, cv, specs, regions + [None] * n_other)


def position_zone(rng, size_range):
    cv = Canvas(rng, size_range)
    zone = one_of(rng, list(ZONES))
    n_other = int(rng.integers(0, 4))
    r = min(base_radius(cv, n_other + 1), 0.17 * cv.min_side)
    target = one_of(rng, SHAPES)
    specs = [spec(target, one_of(rng, cv.allowed), r * rng.uniform(0.6, 1.0))]
    specs += other_specs(rng, cv, n_other, r, avoid_shapes=(target,))
    scene = shapes_scene(rng, cv, specs, [ZONES[zone]] + [None] * n_other)
    obj = scene["objects"][0]
    ref = "shape" if n_other == 0 and rng.random() < 0.3 else name_of(rng, obj)
    q = one_of(rng, [f"Where is the {ref}?", f"Where is the {ref} in the image?",
                 f"In which part of the image is the {ref}?",
                 f"Where is the {ref}: left, right, top, bottom or center?"])
    return QA([scene], q, zone, "position", "zone")


def position_relation(rng, size_range):
    cv = Canvas(rng, size_range)
    horizontal = rng.random() < 0.55
    relation = one_of(rng, ["left", "right"] if horizontal else ["above", "below"])
    scene = _relation_scene(rng, cv, relation, int(rng.integers(0, 3)))
    a, b = name_of(rng, scene["objects"][0]), name_of(rng, scene["objects"][1])
    if horizontal:
        q = one_of(rng, [f"Is the {a} to the left or to the right of the {b}?", f"Is the {a} left or right of the {b}?",
                     f"On which side of the {b} is the {a}, left or right?"])
    else:
        q = one_of(rng, [f"Is the {a} above or below the {b}?", f"Is the {a} above the {b} or below it?"])
    return QA([scene], q, relation, "position", "relation")


# ---------------------------------------------------------------------------------------------- yes/no

def yesno_exists(rng, size_range):
    cv = Canvas(rng, size_range)
    yes = coin(rng)
    s, c = one_of(rng, SHAPES), one_of(rng, cv.allowed)
    n = int(rng.integers(1, 6))
    r = base_radius(cv, n)
    specs = other_specs(rng, cv, n, r, avoid_pairs=((c, s),))
    if yes:
        specs[0] = spec(s, c, r * rng.uniform(0.6, 1.0))
    elif rng.random() < 0.6:  # hard negative: same shape in another colour, or same colour in another shape
        other_c = [x for x in cv.allowed if x != c]
        other_s = [x for x in SHAPES if x != s]
        specs[0] = (spec(s, one_of(rng, other_c), r * 0.8) if rng.random() < 0.5
                    else spec(one_of(rng, other_s), c, r * 0.8))
    scene = shapes_scene(rng, cv, specs)
    a = "an" if c[0] in "aeiou" else "a"
    q = one_of(rng, [f"Is there {a} {c} {s} in the image?", f"Is there {a} {c} {s}?", f"Do you see {a} {c} {s}?",
                 f"Does the image contain {a} {c} {s}?"])
    return QA([scene], q, yes_no(yes), "yesno", "exists")


def yesno_attribute(rng, size_range):
    cv = Canvas(rng, size_range)
    yes = coin(rng)
    n_other = int(rng.integers(0, 4))
    s, scene = unique_shape_scene(rng, cv, n_other)
    true_c = scene["objects"][0]["color"]
    asked = true_c if yes else one_of(rng, [x for x in COLORS if x != true_c])
    q = one_of(rng, [f"Is the {s} {asked}?", f"Is the {s} {asked} in color?", f"Is the color of the {s} {asked}?"])
    return QA([scene], q, yes_no(yes), "yesno", "attribute")


def yesno_count(rng, size_range):
    cv = Canvas(rng, size_range)
    yes = coin(rng)
    k = int(rng.integers(1, 8))
    s = one_of(rng, SHAPES)
    n_other = int(rng.integers(0, 3))
    r = base_radius(cv, k + n_other)
    specs = [spec(s, one_of(rng, cv.allowed), r * rng.uniform(0.7, 1.0)) for _ in range(k)]
    specs += other_specs(rng, cv, n_other, r, avoid_shapes=(s,))
    scene = shapes_scene(rng, cv, specs)
    asked = k if yes else max(1, k + one_of(rng, [-2, -1, 1, 1, 2])) if k > 1 else one_of(rng, [2, 3])
    asked = asked if asked != k or yes else k + 1
    noun = s if asked == 1 else SHAPE_PLURALS[s]
    q = one_of(rng, [f"Are there exactly {asked} {noun}?" if asked > 1 else f"Is there exactly {asked} {noun}?",
                 f"Does the image contain exactly {asked} {noun}?"])
    return QA([scene], q, yes_no(asked == k), "yesno", "count")


def yesno_relation(rng, size_range):
    cv = Canvas(rng, size_range)
    relation = one_of(rng, ["left", "right", "above", "below"])
    scene = _relation_scene(rng, cv, relation, int(rng.integers(0, 3)))
    yes = coin(rng)
    asked = relation if yes else {"left": "right", "right": "left", "above": "below", "below": "above"}[relation]
    a, b = name_of(rng, scene["objects"][0]), name_of(rng, scene["objects"][1])
    phrase = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[asked]
    return QA([scene], f"Is the {a} {phrase} the {b}?", yes_no(yes), "yesno", "relation")


def yesno_bigger(rng, size_range):
    cv = Canvas(rng, size_range)
    n_other = int(rng.integers(0, 3))
    r = base_radius(cv, n_other + 2)
    specs = _two_refs(rng, cv, n_other, r)
    specs[0]["r"], specs[1]["r"] = r, r / rng.uniform(1.5, 2.0)
    if rng.random() < 0.5:
        specs[0], specs[1] = specs[1], specs[0]
    scene = shapes_scene(rng, cv, specs)
    o0, o1 = scene["objects"][:2]
    word = one_of(rng, ["bigger", "larger"]) if rng.random() < 0.7 else "smaller"
    truth = (o0["r"] > o1["r"]) == (word != "smaller")
    q = f"Is the {name_of(rng, o0)} {word} than the {name_of(rng, o1)}?"
    return QA([scene], q, yes_no(truth), "yesno", "bigger")


def yesno_text(rng, size_range):
    cv = Canvas(rng, size_range, "text")
    text = random_text(rng, 0.2)
    item = text_item(rng, cv, text, one_of(rng, text_colors(cv)))
    scene = cv.scene(objects=[], texts=[item], chart=None)
    yes = coin(rng)
    asked = text
    while not yes and asked == text:
        asked = random_text(rng, 1.0 if text.isdigit() else 0.0)
    q = one_of(rng, [f'Does the text say "{asked}"?', f'Is the word "{asked}" written in the image?',
                 f'Does the image say "{asked}"?'] if not asked.isdigit() else
           [f"Is the number {asked} written in the image?", f'Does the text say "{asked}"?'])
    return QA([scene], q, yes_no(yes), "yesno", "text")


def yesno_chart(rng, size_range):
    cv = Canvas(rng, size_range, "chart")
    scene = chart_scene(rng, cv)
    c = scene["chart"]
    big = int(np.argmax(c["values"]))
    yes = coin(rng)
    lbl = c["labels"][big] if yes else one_of(rng, [x for i, x in enumerate(c["labels"]) if i != big])
    q = one_of(rng, [f"Does {lbl} have the largest value?", f"Is {lbl} the largest in the chart?"])
    return QA([scene], q, yes_no(yes), "yesno", "chart")


# -------------------------------------------------------------------------------------------- counting

def _count_scene(rng, cv, k, target, n_other, others_kw):
    r = base_radius(cv, k + n_other)
    specs = [spec(*target(), r * rng.uniform(0.7, 1.0)) for _ in range(k)]
    specs += other_specs(rng, cv, n_other, r, scale=(0.7, 1.0), **others_kw)
    return shapes_scene(rng, cv, specs)


def counting_total(rng, size_range):
    cv = Canvas(rng, size_range)
    k = int(rng.integers(1, 10))
    same = rng.random() < 0.4
    s0 = one_of(rng, SHAPES)
    scene = _count_scene(rng, cv, k, lambda: (s0 if same else one_of(rng, SHAPES), one_of(rng, cv.allowed)), 0, {})
    q = one_of(rng, ["How many shapes are there?", "How many objects are in the image?",
                     "Count the shapes in the image.",
                 "How many shapes can you see?", "How many objects are there?"])
    return QA([scene], q, str(k), "counting", "total")


def counting_shape(rng, size_range):
    cv = Canvas(rng, size_range)
    k, s = int(rng.integers(1, 10)), one_of(rng, SHAPES)
    scene = _count_scene(rng, cv, k, lambda: (s, one_of(rng, cv.allowed)), int(rng.integers(0, 4)),
                         {"avoid_shapes": (s,)})
    p = SHAPE_PLURALS[s]
    q = one_of(rng, [f"How many {p} are there?", f"How many {p} are in the image?", f"Count the {p}.",
                 f"How many {p} can you see?"])
    return QA([scene], q, str(k), "counting", "shape")


def counting_color(rng, size_range):
    cv = Canvas(rng, size_range)
    k, c = int(rng.integers(1, 10)), one_of(rng, cv.allowed)
    scene = _count_scene(rng, cv, k, lambda: (one_of(rng, SHAPES), c), int(rng.integers(0, 4)), {"avoid_colors": (c,)})
    q = one_of(rng, [f"How many {c} shapes are there?", f"How many {c} objects are in the image?",
                 f"Count the {c} shapes."])
    return QA([scene], q, str(k), "counting", "color")


def counting_pair(rng, size_range):
    cv = Canvas(rng, size_range)
    k, c, s = int(rng.integers(1, 10)), one_of(rng, cv.allowed), one_of(rng, SHAPES)
    n_other = int(rng.integers(1, 4))
    r = base_radius(cv, k + n_other)
    specs = [spec(s, c, r * rng.uniform(0.7, 1.0)) for _ in range(k)]
    other_c = [x for x in cv.allowed if x != c]
    other_s = [x for x in SHAPES if x != s]
    for _ in range(n_other):  # distractors share the colour or the shape, never both
        if rng.random() < 0.5:
            specs.append(spec(s, one_of(rng, other_c), r * 0.85))
        else:
            specs.append(spec(one_of(rng, other_s), c, r * 0.85))
    scene = shapes_scene(rng, cv, specs)
    q = one_of(rng, [f"How many {c} {SHAPE_PLURALS[s]} are there?",
                     f"How many {c} {SHAPE_PLURALS[s]} are in the image?"])
    return QA([scene], q, str(k), "counting", "pair")
