"""Vocabularies and scene sampling for the synthetic generator.

A *scene* is a plain dict (JSON-friendly: str, int, float, lists) describing one image completely: its size,
background, objects (shape, colour, centre, radius in pixels), texts, chart and augmentations.
:func:`.render.render_scene` draws it. Scenes are the ground truth stored in ``Sample.meta``.
"""

from __future__ import annotations

import math

import numpy as np

from .render import FONT_STYLES, text_size

# ----------------------------------------------------------------------------------------- vocabularies

# Colour name -> prototype RGB values (an object's colour is one prototype plus a small jitter).
COLOR_PROTOTYPES = {
    "red": [(220, 20, 20), (255, 0, 0), (200, 30, 45)],
    "orange": [(255, 140, 0), (250, 130, 10), (255, 165, 30)],
    "yellow": [(255, 220, 0), (240, 230, 40), (255, 255, 0)],
    "green": [(30, 160, 50), (0, 200, 0), (40, 130, 40)],
    "blue": [(20, 60, 230), (0, 0, 255), (40, 100, 220)],
    "purple": [(130, 40, 180), (128, 0, 128), (150, 70, 200)],
    "pink": [(255, 105, 180), (255, 130, 200), (240, 90, 160)],
    "brown": [(140, 80, 30), (120, 70, 20), (160, 95, 45)],
    "black": [(15, 15, 15), (0, 0, 0), (40, 40, 40)],
    "white": [(250, 250, 250), (255, 255, 255), (235, 235, 235)],
    "gray": [(128, 128, 128), (150, 150, 150), (105, 105, 105)],
}
COLORS = tuple(COLOR_PROTOTYPES)
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
SHAPE_PLURALS = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
POSITIONS = ("left", "right", "top", "bottom", "center")  # answers to "Where is the X?"
RELATIONS = ("left", "right", "above", "below")  # answers to "Is A left or right of B?" etc.
GRID_POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
                  "bottom right")  # 3x3 buckets of an object's centre (labels, captions)
SCENE_TYPES = ("shapes", "text", "chart")
CHART_KINDS = ("bar", "hbar", "pie")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")

_WORDS = """
able acid army away baby back bake ball band bank base bath bean bear beat bed beef bell belt best bike
bill bird boat body bone book boot born boss bowl box boy bread brick bus busy cake call calm camp card
care cart case cash cat chair chalk cheap chess city clay clean clock cloud coat code coin cold cook cool
copy corn cost cow crab cup cute dance data date day deal deep deer desk dish dog doll door down draw dream
dress drink drum duck dust early earth east easy egg face fact fair farm fast fire fish flag flat floor
flow food foot fork free frog fruit fun game gate gift girl glad glass goal gold good grass hair half hall
hand happy hard hat head heat help hero high hill home hope horse hot hour house ice idea iron jam job joke
juice jump key kind king kite lake lamp land last leaf lemon life light lion list long love luck lunch map
mask meal milk mind money moon more mouse music name nest news nice night nose note ocean oil open page
paint pan paper park party path peace pen piano pig pizza plan plant plate play pool rain read rice ring
river road rock roof room rope rose safe salt sand school sea seed sheep ship shoe shop sing sink sky sleep
slow smile snow soap sock soft song soup spoon sport stone storm sugar table tail talk tea team tent test
time toast today tooth town toy train tree truck turn vase wall warm watch water wave week well whale wind
wine wing winter wolf wood word work world year zebra apple banana bottle bridge button candle carrot
castle cheese cherry coffee cookie dragon fence flower forest garden guitar honey island jacket kitten
ladder letter market mirror monkey pencil pepper pillow planet pocket rabbit robot rocket salad silver
spider summer sunset tiger tomato turtle violin wallet window bag cap fox owl bee ant van jet sun fan
"""
WORDS = tuple(dict.fromkeys(w for w in _WORDS.split() if 3 <= len(w) <= 6))  # words to read (lowercase)
CHART_LABELS = ("apple", "pear", "plum", "kiwi", "lime", "fig", "mango", "grape", "peach", "lemon", "cat", "dog",
                "fish", "bird", "cow", "pig", "duck", "frog", "bear", "lion", "bus", "car", "bike", "train",
                "boat", "ship", "tea", "milk", "juice", "soda", "north", "south", "east", "west", "rock", "jazz",
                "pop", "folk", "gold", "iron")
CHART_TITLES = ("Sales", "Votes", "Scores", "Results", "Survey", "Budget", "Visitors", "Favorites")

# ------------------------------------------------------------------------------------------- colours


def color_distance(a, b) -> float:
    """'Redmean' RGB distance, a cheap approximation of perceived colour difference (0 .. ~765)."""
    r = (a[0] + b[0]) / 2
    dr, dg, db = a[0] - b[0], a[1] - b[1], a[2] - b[2]
    return math.sqrt((2 + r / 256) * dr * dr + 4 * dg * dg + (2 + (255 - r) / 256) * db * db)


def object_rgb(rng: np.random.Generator, name: str, jitter: int = 14) -> list[int]:
    protos = COLOR_PROTOTYPES[name]
    base = np.array(protos[int(rng.integers(len(protos)))])
    if name in ("black", "white", "gray"):  # keep achromatic colours neutral
        noise = rng.integers(-jitter, jitter + 1) + rng.integers(-3, 4, 3)
    else:
        noise = rng.integers(-jitter, jitter + 1, 3)
    return np.clip(base + noise, 0, 255).astype(int).tolist()


def _clip_rgb(c) -> list[int]:
    return [int(min(255, max(0, round(v)))) for v in c]


# --------------------------------------------------------------------------------------------- canvas

def sample_size(rng: np.random.Generator, size_range=(96, 512), min_short: int = 0) -> tuple[int, int]:
    """A random (width, height) in size_range: log-uniform long side, aspect ratio up to 2."""
    lo, hi = int(size_range[0]), int(size_range[1])
    lo = max(lo, min(min_short, hi))
    long = math.exp(rng.uniform(math.log(lo), math.log(hi) + 1e-9))
    aspect = 1.0 if rng.random() < 0.3 else math.exp(rng.uniform(0, math.log(2.0)))
    short = max(lo, long / aspect)
    long, short = int(round(min(hi, long))), int(round(min(hi, short)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _bg_color(rng: np.random.Generator, tone: str) -> list[float]:
    tint = rng.uniform(-1, 1, 3)
    if tone == "white":
        return _clip_rgb([255 - rng.uniform(0, 10)] * 3)
    if tone == "light":
        return _clip_rgb(rng.uniform(195, 240) + tint * rng.uniform(0, 18))
    if tone == "dark":
        return _clip_rgb(rng.uniform(15, 65) + tint * rng.uniform(0, 18))
    if tone == "mid":
        return _clip_rgb(rng.uniform(85, 170) + tint * rng.uniform(0, 25))
    return _clip_rgb(rng.uniform(60, 230, 3))  # "colored"


def sample_background(rng: np.random.Generator, tones=None) -> dict:
    tones = tones or (("white", 0.25), ("light", 0.35), ("dark", 0.2), ("mid", 0.08), ("colored", 0.12))
    names, probs = zip(*tones)
    probs = np.array(probs) / sum(probs)
    tone = names[int(rng.choice(len(names), p=probs))]
    c = _bg_color(rng, tone)
    if tone == "white":
        return {"kind": "flat", "tone": tone, "colors": [c]}
    kind = ("flat", "gradient", "texture", "pattern")[int(rng.choice(4, p=[0.4, 0.25, 0.25, 0.1]))]
    if kind == "flat":
        return {"kind": kind, "tone": tone, "colors": [c]}
    if kind == "gradient":
        c2 = _clip_rgb(np.array(c) + rng.uniform(-45, 45, 3))
        return {"kind": kind, "tone": tone, "colors": [c, c2],
                "direction": ("horizontal", "vertical", "diagonal")[int(rng.integers(3))]}
    if kind == "texture":
        return {"kind": kind, "tone": tone, "colors": [c], "amplitude": float(rng.uniform(8, 28)),
                "cells": int(rng.integers(3, 14)), "mono": bool(rng.random() < 0.6),
                "seed": int(rng.integers(2**31))}
    c2 = _clip_rgb(np.array(c) + rng.choice([-1, 1]) * rng.uniform(10, 25))
    return {"kind": kind, "tone": tone, "colors": [c, c2], "pattern": ("stripes", "checks")[int(rng.integers(2))],
            "period": float(rng.uniform(0.04, 0.12))}


def background_extremes(bg: dict) -> list[list[int]]:
    """Colours the background can take (for contrast checks)."""
    cols = [list(c) for c in bg["colors"]]
    if bg["kind"] == "texture":
        a = bg["amplitude"]
        c = np.array(cols[0])
        cols = [_clip_rgb(c + a), _clip_rgb(c - a), _clip_rgb(c + a * np.array([1, -1, 1])),
                _clip_rgb(c + a * np.array([-1, 1, -1]))]
    return cols


def luminance(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def contrasting_colors(bg: dict, threshold: float = 150.0, min_luma: float = 0.0) -> list[str]:
    """Colour names all of whose prototypes stand out from every colour of the background (redmean distance
    >= threshold and luminance difference >= min_luma)."""
    ext = background_extremes(bg)
    return [name for name, protos in COLOR_PROTOTYPES.items()
            if all(color_distance(p, e) >= threshold and abs(luminance(p) - luminance(e)) >= min_luma
                   for p in protos for e in ext)]


def mean_rgb(bg: dict) -> list[int]:
    return _clip_rgb(np.mean(np.array(bg["colors"], float), 0))


class Canvas:
    """Image size + background + the colour names that contrast with it."""

    def __init__(self, rng, size_range, scene_type="shapes", min_colors=5, threshold=150.0, tones=None):
        min_short = {"shapes": 0, "text": 112, "chart": 200}[scene_type]
        self.width, self.height = sample_size(rng, size_range, min_short)
        if scene_type == "chart":  # charts: landscape or square, at most 1.6:1, so labels stay legible
            w, h = max(self.width, self.height), min(self.width, self.height)
            self.width, self.height = w, max(h, int(w / 1.6))
        for _ in range(50):
            self.bg = sample_background(rng, tones)
            self.allowed = contrasting_colors(self.bg, threshold)
            if len(self.allowed) >= min_colors:
                break
        else:  # pragma: no cover - white always leaves 9 colours
            self.bg = {"kind": "flat", "tone": "white", "colors": [[250, 250, 250]]}
            self.allowed = contrasting_colors(self.bg, threshold)
        self.type = scene_type

    @property
    def min_side(self) -> int:
        return min(self.width, self.height)

    def scene(self, **content) -> dict:
        return {"type": self.type, "width": self.width, "height": self.height, "background": self.bg, **content}


# --------------------------------------------------------------------------------------------- layout

def base_radius(cv: Canvas, n: int) -> float:
    """A comfortable object radius (px) for n objects on the canvas."""
    return cv.min_side * min(0.3, 0.44 / math.sqrt(n + 1.2))


def place(rng, cv: Canvas, radii, regions=None, fixed=(), gap=0.03, tries=60):
    """Non-overlapping centres for circles of `radii` (px), each optionally inside a region (fractions
    x0, y0, x1, y1 of the canvas, for the centre). `fixed`: already placed (x, y, r). Returns a list of
    (x, y) or None when it fails (callers shrink and retry)."""
    W, H = cv.width, cv.height
    g = gap * cv.min_side
    placed = [tuple(f) for f in fixed]
    out = [None] * len(radii)
    regions = regions or [None] * len(radii)
    order = sorted(range(len(radii)), key=lambda i: (regions[i] is None, -radii[i]))
    for i in order:
        r = radii[i]
        x0, y0, x1, y1 = regions[i] or (0, 0, 1, 1)
        lx, hx = max(r + 2, x0 * W), min(W - r - 2, x1 * W)
        ly, hy = max(r + 2, y0 * H), min(H - r - 2, y1 * H)
        if lx > hx or ly > hy:
            return None
        for _ in range(tries):
            x, y = rng.uniform(lx, hx), rng.uniform(ly, hy)
            if all((x - px) ** 2 + (y - py) ** 2 >= (r + pr + g) ** 2 for px, py, pr in placed):
                break
        else:
            return None
        placed.append((x, y, r))
        out[i] = (float(x), float(y))
    return out


def make_objects(rng, cv: Canvas, specs, regions=None, shrink=0.85):
    """specs: dicts with shape, color, r (px). Places them (shrinking everything until it fits) and
    returns object dicts sorted as given."""
    radii = [s["r"] for s in specs]
    for _ in range(30):
        pos = place(rng, cv, radii, regions)
        if pos is not None:
            break
        radii = [r * shrink for r in radii]
    else:
        raise RuntimeError("could not place objects")  # pragma: no cover
    objs = []
    outline = rng.random() < 0.15
    outline_rgb = [20, 20, 20] if np.mean(mean_rgb(cv.bg)) > 110 else [235, 235, 235]
    for s, r, (x, y) in zip(specs, radii, pos):
        objs.append({"shape": s["shape"], "color": s["color"], "rgb": object_rgb(rng, s["color"]),
                     "x": round(x, 2), "y": round(y, 2), "r": round(float(r), 2),
                     "angle": 0.0 if s["shape"] == "circle" else round(float(rng.uniform(-12, 12)), 1),
                     "outline": outline_rgb if outline and s["color"] not in ("black", "white") else None})
    return objs


def grid_position(obj: dict, scene: dict) -> str:
    col = min(2, int(3 * obj["x"] / scene["width"]))
    row = min(2, int(3 * obj["y"] / scene["height"]))
    return GRID_POSITIONS[row * 3 + col]


# Zones for "Where is the X?" answers: the centre must lie inside (fractions of width/height).
ZONES = {
    "left": (0.0, 0.36, 0.25, 0.64), "right": (0.75, 0.36, 1.0, 0.64), "top": (0.36, 0.0, 0.64, 0.25),
    "bottom": (0.36, 0.75, 0.64, 1.0), "center": (0.4, 0.4, 0.6, 0.6),
}


def zone_of(obj: dict, scene: dict) -> str | None:
    fx, fy = obj["x"] / scene["width"], obj["y"] / scene["height"]
    for name, (x0, y0, x1, y1) in ZONES.items():
        if x0 <= fx <= x1 and y0 <= fy <= y1:
            return name
    return None


# -------------------------------------------------------------------------------------- augmentations

def sample_aug(rng, scene: dict, min_detail: float | None = None) -> dict:
    """Random augmentations; `min_detail` (px) = size of the smallest thing that must stay readable."""
    aug = {"draw_scale": 1.0}
    u = rng.random()
    if u < 0.3:
        aug["draw_scale"] = 2.0  # antialiased edges
    elif u < 0.42 and (min_detail is None or min_detail >= 18):
        aug["draw_scale"] = 0.6  # soft / blocky
    detail = min_detail if min_detail is not None else 0.1 * min(scene["width"], scene["height"])
    if rng.random() < 0.25:
        aug["blur"] = round(float(rng.uniform(0.3, max(0.4, min(1.6, detail * 0.06)))), 2)
    if rng.random() < 0.4:
        aug["noise"] = round(float(rng.uniform(2, 14)), 2)
        aug["noise_seed"] = int(rng.integers(2**31))
    if rng.random() < 0.6:
        aug["jpeg"] = int(rng.integers(30, 96))
    return aug


# ---------------------------------------------------------------------------------------- text scenes

def text_item(rng, cv: Canvas, text: str, color: str, height_frac=(0.16, 0.34), max_width_frac=0.86,
              region=(0.0, 0.0, 1.0, 1.0), angle_max=12.0) -> dict:
    """A text item (font, size, angle, centre) that fits inside region of the canvas."""
    style = FONT_STYLES[int(rng.integers(len(FONT_STYLES)))]
    case = rng.random()
    rendered = text if text.isdigit() or case < 0.6 else text.capitalize() if case < 0.8 else text.upper()
    angle = round(float(rng.uniform(-angle_max, angle_max)), 1) if rng.random() < 0.6 else 0.0
    x0, y0, x1, y1 = region
    rw, rh = (x1 - x0) * cv.width, (y1 - y0) * cv.height
    size = int(rng.uniform(*height_frac) * cv.height * 1.3)
    for _ in range(20):
        tw, th = text_size(rendered, style, size, angle)
        if tw <= rw * max_width_frac and th <= rh * 0.9:
            break
        size = int(size * 0.88)
    tw, th = text_size(rendered, style, size, angle)
    cx = rng.uniform(x0 * cv.width + tw / 2 + 2, max(x0 * cv.width + tw / 2 + 2, x1 * cv.width - tw / 2 - 2))
    cy = rng.uniform(y0 * cv.height + th / 2 + 2, max(y0 * cv.height + th / 2 + 2, y1 * cv.height - th / 2 - 2))
    return {"text": text, "rendered": rendered, "color": color, "rgb": object_rgb(rng, color, 10), "font": style,
            "size": size, "angle": angle, "x": round(float(cx), 1), "y": round(float(cy), 1),
            "box": [round(float(cx - tw / 2)), round(float(cy - th / 2)), round(float(cx + tw / 2)),
                    round(float(cy + th / 2))]}


def random_text(rng, number_p=0.3) -> str:
    if rng.random() < number_p:
        digits = int(rng.integers(1, 4))
        return str(int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)))
    return WORDS[int(rng.integers(len(WORDS)))]


# --------------------------------------------------------------------------------------- chart scenes

def chart_values(rng, n: int, kind: str, margin: int = 6) -> list[int]:
    """Values with a unique maximum and minimum (by at least `margin`); pie values are percentages."""
    while True:
        if kind == "pie":
            raw = rng.dirichlet(np.full(n, 2.0))
            vals = np.maximum(8, np.round(raw * 100)).astype(int)
            vals[int(np.argmax(vals))] += 100 - vals.sum()
            if vals.min() < 8:
                continue
        else:
            hi = int(rng.choice([10, 20, 50, 100, 100]))
            vals = rng.integers(max(1, hi // 10), hi + 1, n)
        s = np.sort(vals)
        m = max(1 if kind != "pie" and max(vals) <= 20 else margin, int(0.08 * s[-1]))
        if s[-1] - s[-2] >= m and s[1] - s[0] >= max(1, m // 2):
            return [int(v) for v in vals]


def chart_scene(rng, cv: Canvas, kind: str | None = None, n: int | None = None) -> dict:
    kind = kind or ("bar", "bar", "hbar", "pie", "pie")[int(rng.integers(5))]
    n = n or int(rng.integers(3, 6))
    labels = [CHART_LABELS[i] for i in rng.choice(len(CHART_LABELS), n, replace=False)]
    values = chart_values(rng, n, kind)
    pool = [c for c in cv.allowed if c not in ("white", "black") or kind != "pie"]
    if kind == "pie" or rng.random() < 0.5:
        order = rng.permutation(len(pool))  # distinct colours while there are enough (a contrast-limited
        names = [pool[order[i % len(pool)]] for i in range(n)]  # palette can be smaller than n: then they repeat)
    else:
        names = [pool[int(rng.integers(len(pool)))]] * n
    fg = [20, 20, 20] if np.mean(mean_rgb(cv.bg)) > 110 else [240, 240, 240]
    chart = {"kind": kind, "labels": labels, "values": values, "color_names": names,
             "colors": [object_rgb(rng, c, 8) for c in names], "fg": fg, "bg_rgb": mean_rgb(cv.bg),
             "font": FONT_STYLES[int(rng.integers(len(FONT_STYLES)))],
             "font_scale": round(float(rng.uniform(0.07, 0.095)), 3),
             "bar_width": round(float(rng.uniform(0.5, 0.8)), 2),
             "start_angle": round(float(rng.uniform(0, 360)), 1),
             "title": CHART_TITLES[int(rng.integers(len(CHART_TITLES)))] if rng.random() < 0.4 else None}
    return cv.scene(objects=[], texts=[], chart=chart)

