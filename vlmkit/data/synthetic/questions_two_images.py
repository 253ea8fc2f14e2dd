"""Question builders about two images: which has more, are they the same, yes/no across both."""

from __future__ import annotations

import numpy as np

from .qa import QA, coin, one_of, other_specs, shapes_scene, some_of, spec, yes_no
from .scenes import SHAPES, SHAPE_PLURALS, Canvas, base_radius, object_rgb, place


# ------------------------------------------------------------------------------------------- two images

def _random_shapes(rng, cv, n, **kw):
    r = base_radius(cv, n)
    return other_specs(rng, cv, n, r, scale=(0.65, 1.0), **kw)


def two_more(rng, size_range):
    k1, k2 = some_of(rng, range(1, 10), 2)
    by_shape = rng.random() < 0.5
    s = one_of(rng, SHAPES)
    scenes = []
    for k in (k1, k2):
        cv = Canvas(rng, size_range)
        if by_shape:
            r = base_radius(cv, k + 2)
            specs = [spec(s, one_of(rng, cv.allowed), r * rng.uniform(0.7, 1.0)) for _ in range(k)]
            specs += other_specs(rng, cv, int(rng.integers(0, 3)), r, avoid_shapes=(s,))
        else:
            specs = _random_shapes(rng, cv, k)
        scenes.append(shapes_scene(rng, cv, specs))
    noun = SHAPE_PLURALS[s] if by_shape else one_of(rng, ["shapes", "objects"])
    q = one_of(rng, [f"Which image has more {noun}, the first or the second?",
                 f"Which of the two images contains more {noun}: the first or the second?",
                 f"Which image has more {noun}? Answer first or second."])
    return QA(scenes, q, "first" if k1 > k2 else "second", "two_image", "more")


def _recolor(rng, cv, obj):
    obj["color"] = one_of(rng, [x for x in cv.allowed if x != obj["color"]])
    obj["rgb"] = object_rgb(rng, obj["color"])


def two_same(rng, size_range):
    cv = Canvas(rng, size_range)
    n = int(rng.integers(1, 6))
    a = shapes_scene(rng, cv, _random_shapes(rng, cv, n))
    b = {**a, "objects": [dict(o) for o in a["objects"]]}
    same = coin(rng)
    if not same:
        objs = b["objects"]
        i = int(rng.integers(len(objs)))
        change = one_of(rng, ["color", "shape", "remove", "add"] if len(objs) > 1 else ["color", "shape", "add"])
        if change == "color":
            _recolor(rng, cv, objs[i])
        elif change == "shape":
            objs[i]["shape"] = one_of(rng, [x for x in SHAPES if x != objs[i]["shape"]])
        elif change == "remove":
            objs.pop(i)
        else:
            r = float(np.mean([o["r"] for o in objs]))
            pos = place(rng, cv, [r], fixed=[(o["x"], o["y"], o["r"]) for o in objs])
            if pos is None:  # no room: change a colour instead
                change = "color"
                _recolor(rng, cv, objs[i])
            else:
                s, c = one_of(rng, SHAPES), one_of(rng, cv.allowed)
                objs.append({**objs[i], "shape": s, "color": c, "rgb": object_rgb(rng, c), "x": round(pos[0][0], 2),
                             "y": round(pos[0][1], 2), "r": round(r, 2)})
        b["change"] = change
    q = one_of(rng, ["Are the two images the same or different?", "Are these two images the same or different?",
                 "Do the two images show the same thing? Answer same or different."])
    return QA([a, b], q, "same" if same else "different", "two_image", "same")


def two_yesno(rng, size_range):
    scenes = []
    yes = coin(rng)
    if rng.random() < 0.5:
        s = one_of(rng, SHAPES)
        first = None
        for _ in range(2):
            cv = Canvas(rng, size_range)
            if first is None:
                c = one_of(rng, cv.allowed)
                first = c
            elif yes and first in cv.allowed:
                c = first
            else:
                c = one_of(rng, [x for x in cv.allowed if x != first])
            n_other = int(rng.integers(0, 3))
            r = base_radius(cv, n_other + 1)
            specs = [spec(s, c, r * 0.9)] + other_specs(rng, cv, n_other, r, avoid_shapes=(s,))
            scenes.append(shapes_scene(rng, cv, specs))
        same = scenes[0]["objects"][0]["color"] == scenes[1]["objects"][0]["color"]
        q = one_of(rng, [f"Is the {s} the same color in both images?",
                         f"Does the {s} have the same color in both images?"])
        return QA(scenes, q, yes_no(same), "two_image", "same_color")
    k1 = int(rng.integers(1, 8))
    k2 = k1 if yes else one_of(rng, [k for k in range(1, 9) if k != k1])
    for k in (k1, k2):
        cv = Canvas(rng, size_range)
        scenes.append(shapes_scene(rng, cv, _random_shapes(rng, cv, k)))
    q = one_of(rng, ["Do both images have the same number of shapes?",
                 "Do the two images contain the same number of objects?"])
    return QA(scenes, q, yes_no(k1 == k2), "two_image", "same_count")
