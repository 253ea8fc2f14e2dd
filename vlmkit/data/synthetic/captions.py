"""Captions of a scene: the short canonical one (the 'caption' category's answer) and the long descriptive one."""

from __future__ import annotations

import numpy as np

from .scenes import NUMBER_WORDS, SHAPE_PLURALS, grid_position


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _count_phrase(n: int, color: str | None, shape: str) -> str:
    noun = shape if n == 1 else SHAPE_PLURALS[shape]
    num = _a(color or shape) if n == 1 else NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return " ".join(p for p in (num, color, noun) if p)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def groups(scene: dict) -> list[tuple[str, str, int]]:
    """(color, shape, count) groups in order of first appearance from the left."""
    out: dict[tuple[str, str], int] = {}
    for o in sorted(scene["objects"], key=lambda o: o["x"]):
        out[(o["color"], o["shape"])] = out.get((o["color"], o["shape"]), 0) + 1
    return [(c, s, n) for (c, s), n in out.items()]


def short_caption(scene: dict) -> str:
    """Canonical few-word caption (the answer of the 'caption' category)."""
    if scene["type"] == "text":
        t = scene["texts"][0]["text"]
        return f"the number {t}" if t.isdigit() else f"the word {t}"
    if scene["type"] == "chart":
        c = scene["chart"]
        n = len(c["labels"])
        return f"a pie chart with {n} slices" if c["kind"] == "pie" else f"a bar chart with {n} bars"
    gs = groups(scene)
    if len(gs) <= 2:
        return " and ".join(_count_phrase(n, c, s) for c, s, n in gs)
    return f"{NUMBER_WORDS[len(scene['objects'])] if len(scene['objects']) < 13 else len(scene['objects'])} shapes"


def _bg_phrase(bg: dict) -> str:
    tone = {"white": "white", "light": "light", "dark": "dark", "mid": "gray", "colored": "colored"}[bg["tone"]]
    kind = {"flat": "", "gradient": " gradient", "texture": " textured", "pattern": " patterned"}[bg["kind"]]
    return f"a {tone}{kind} background"


def long_caption(rng, scene: dict) -> str:
    """A detailed one-to-three-sentence caption from the scene (stage-1 captioning target)."""
    opener = ["", "An image of ", "A picture showing ", "This image shows "][int(rng.integers(4))]
    if scene["type"] == "text":
        t = scene["texts"][0]
        what = f'the number {t["text"]}' if t["text"].isdigit() else f'the word "{t["rendered"]}"'
        tilt = ", slightly tilted" if abs(t.get("angle", 0)) > 3 else ""
        extra = ""
        if len(scene["texts"]) > 1:
            extra = " Also written: " + _join([f'"{u["rendered"]}" in {u["color"]}' for u in scene["texts"][1:]]) + "."
        body = f"{what} written in {t['color']}{tilt}, on {_bg_phrase(scene['background'])}."
        text = (opener + body) if opener else body[0].upper() + body[1:]
        return text + extra
    if scene["type"] == "chart":
        c = scene["chart"]
        unit = "%" if c["kind"] == "pie" else ""
        items = _join([f"{lbl} {v}{unit}" for lbl, v in zip(c["labels"], c["values"])])
        big = c["labels"][int(np.argmax(c["values"]))]
        what = {"pie": "a pie chart", "hbar": "a horizontal bar chart", "bar": "a bar chart"}[c["kind"]]
        title = f' titled "{c["title"]}"' if c.get("title") else ""
        body = f"{what}{title} with {len(c['labels'])} {'slices' if c['kind'] == 'pie' else 'bars'}: {items}."
        text = (opener + body) if opener else body[0].upper() + body[1:]
        return text + f" The largest is {big}."
    objs = scene["objects"]
    if len(objs) <= 4:
        parts = []
        big = max(objs, key=lambda o: o["r"])
        for o in sorted(objs, key=lambda o: o["x"]):
            clearly_big = o is big and all(o["r"] > 1.3 * p["r"] for p in objs if p is not o)
            size = "large " if len(objs) > 1 and clearly_big else ""
            pos = grid_position(o, scene)
            where = ("in the center" if pos == "center" else f"on the {pos}" if pos in ("left", "right")
                     else f"at the {pos}")
            desc = f"{size}{o['color']} {o['shape']}"
            parts.append(f"{_a(desc)} {desc} {where}")
        body = _join(parts)
    else:
        body = f"{NUMBER_WORDS[len(objs)] if len(objs) < 13 else len(objs)} shapes: " + _join(
            [_count_phrase(n, c, s) for c, s, n in groups(scene)])
    body += f", on {_bg_phrase(scene['background'])}."
    return (opener + body) if opener else body[0].upper() + body[1:]
