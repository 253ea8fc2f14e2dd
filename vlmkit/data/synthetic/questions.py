"""The question builders by category (`BUILDERS`, `pick_builder`), the caption builder, and `derived_questions`,
which asks further questions about an existing scene (for multi-turn conversations)."""

from __future__ import annotations

import numpy as np

from .captions import short_caption
from .qa import QA, coin, color_word, one_of, shapes_scene, spec, text_colors, yes_no
from .questions_reading import READ_NUMBER, READ_WORD, chart_question, text_single, text_two
from .questions_shapes import (
    color_extreme, color_text, color_unique_shape, counting_color, counting_pair, counting_shape, counting_total,
    position_relation, position_zone, shape_extreme, shape_side, shape_unique_color, yesno_attribute, yesno_bigger,
    yesno_chart, yesno_count, yesno_exists, yesno_relation, yesno_text,
)
from .questions_two_images import two_more, two_same, two_yesno
from .scenes import COLORS, SHAPES, SHAPE_PLURALS, Canvas, base_radius, chart_scene, random_text, text_item, zone_of


# --------------------------------------------------------------------------------------------- caption

_SHORT_CAPTION_Q = ["Describe the image in a few words.", "Give a short caption for this image.",
                    "What does the image show? Answer briefly.", "Caption this image briefly."]


def caption_short(rng, size_range):
    u = rng.random()
    if u < 0.15:
        cv = Canvas(rng, size_range, "text")
        item = text_item(rng, cv, random_text(rng), one_of(rng, text_colors(cv)))
        scene = cv.scene(objects=[], texts=[item], chart=None)
    elif u < 0.3:
        cv = Canvas(rng, size_range, "chart")
        scene = chart_scene(rng, cv)
    else:
        cv = Canvas(rng, size_range)
        two = rng.random() < 0.5
        n1 = int(rng.integers(1, 5 if two else 7))
        s1, c1 = one_of(rng, SHAPES), one_of(rng, cv.allowed)
        groups = [(s1, c1, n1)]
        if two:
            s2, c2 = one_of(rng, SHAPES), one_of(rng, cv.allowed)
            while (s2, c2) == (s1, c1):
                s2, c2 = one_of(rng, SHAPES), one_of(rng, cv.allowed)
            groups.append((s2, c2, int(rng.integers(1, 4))))
        n = sum(g[2] for g in groups)
        r = base_radius(cv, n)
        specs, regions = [], []
        for gi, (s, c, k) in enumerate(groups):
            specs += [spec(s, c, r * rng.uniform(0.7, 1.0)) for _ in range(k)]
            regions += [None if not two else (0, 0, 0.45, 1) if gi == 0 else (0.55, 0, 1, 1)] * k
        scene = shapes_scene(rng, cv, specs, regions)
    return QA([scene], one_of(rng, _SHORT_CAPTION_Q), short_caption(scene), "caption", "short")


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
            out.append(("text", one_of(rng, READ_NUMBER if t["text"].isdigit() else READ_WORD), t["text"]))
            out.append(("color", f"What {color_word(rng)} is the text?", t["color"]))
            other = random_text(rng, 0.0)
            asked = t["text"] if coin(rng) or other == t["text"] else other
            out.append(("yesno", f'Does the text say "{asked}"?', yes_no(asked == t["text"])))
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
        s = one_of(rng, present)
        out.append(("counting", f"How many {SHAPE_PLURALS[s]} are there?", str(shape_n[s])))
    for o in objs:
        if shape_n[o["shape"]] == 1:
            out.append(("color", f"What {color_word(rng)} is the {o['shape']}?", o["color"]))
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
        out.append(("color", f"What {color_word(rng)} is the biggest shape?", big["color"]))
        out.append(("shape", "What shape is the biggest?", big["shape"]))
    o = one_of(rng, objs)
    if coin(rng):
        c, s = o["color"], o["shape"]
    else:
        c, s = one_of(rng, COLORS), one_of(rng, SHAPES)
    present_pair = any(p["color"] == c and p["shape"] == s for p in objs)
    out.append(("yesno", f"Is there {'an' if c[0] in 'aeiou' else 'a'} {c} {s}?", yes_no(present_pair)))
    return out
