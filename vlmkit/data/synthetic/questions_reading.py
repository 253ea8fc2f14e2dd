"""Question builders that read: rendered words and numbers, and charts."""

from __future__ import annotations

import numpy as np

from .qa import QA, one_of, some_of, text_colors
from .scenes import Canvas, chart_scene, random_text, text_item


# ------------------------------------------------------------------------------------------------ text

READ_WORD = ["What does the text say?", "What word is written in the image?", "What is written in the image?",
              "Read the text in the image.", "What word is shown?", "What is written here?"]
READ_NUMBER = ["What number is shown?", "What number is written in the image?", "What does the text say?",
                "Read the number in the image.", "What is written here?"]


def text_single(rng, size_range):
    cv = Canvas(rng, size_range, "text")
    text = random_text(rng)
    item = text_item(rng, cv, text, one_of(rng, text_colors(cv)))
    scene = cv.scene(objects=[], texts=[item], chart=None)
    return QA([scene], one_of(rng, READ_NUMBER if text.isdigit() else READ_WORD), text, "text", "single")


def text_two(rng, size_range):
    cv = Canvas(rng, size_range, "text")
    tall = cv.height >= 0.8 * cv.width
    halves = [(0, 0, 1, 0.5), (0, 0.5, 1, 1)] if tall else [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]
    t1 = random_text(rng, 0.25)
    t2 = t1
    while t2 == t1:
        t2 = random_text(rng, 0.25)
    cols = text_colors(cv)
    c1, c2 = some_of(rng, cols, 2) if len(cols) > 1 else (cols[0], cols[0])
    items = [text_item(rng, cv, t1, c1, (0.1, 0.2), 0.9, halves[0], 8.0),
             text_item(rng, cv, t2, c2, (0.1, 0.2), 0.9, halves[1], 8.0)]
    scene = cv.scene(objects=[], texts=items, chart=None)
    i = int(rng.integers(2))
    if c1 != c2 and rng.random() < 0.35:
        q = f"What is written in {items[i]['color']}?"
    else:
        where = (("at the top", "at the bottom") if tall else ("on the left", "on the right"))[i]
        q = one_of(rng, [f"What is written {where}?", f"What does the text {where} say?"])
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
            q = one_of(rng, [f"Which slice is the {w}?", f"Which label has the {w} share?",
                             f"Which category is the {w}?"])
        else:
            tall = ("tallest" if big else "shortest") if c["kind"] == "bar" else ("longest" if big else "shortest")
            hv = "highest" if big else "lowest"
            q = one_of(rng, [f"Which bar is the {tall}?", f"Which label has the {hv} value?",
                         f"Which category has the {w} value?"])
        return QA([scene], q, c["labels"][i], "chart", "largest" if big else "smallest")
    i = int(rng.integers(len(c["labels"])))
    lbl = c["labels"][i]
    if pie:
        q = one_of(rng, [f"What percentage is {lbl}?", f"What is the share of {lbl} in percent?",
                     f"What is the value of {lbl}?"])
    else:
        q = one_of(rng, [f"What is the value of {lbl}?", f"What value does {lbl} have?", f"How much is {lbl}?"])
    return QA([scene], q, str(c["values"][i]), "chart", "value")
