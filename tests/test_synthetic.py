"""The synthetic data generator: determinism, closed vocabularies, ground truth, benchmark split, speed smoke."""

import io
import math
import re
import time

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.synthetic import render
from vlmkit.data.synthetic.scenes import ZONES, contrasting_colors, zone_of
from vlmkit.data.synthetic import (
    ANSWERS, BENCHMARK_CATEGORIES, CATEGORIES, CHART_LABELS, COLORS, LABEL_CLASSES, SHAPE_PLURALS, SHAPES,
    TRAIN_SEED_LIMIT, WORDS, Sample, SyntheticGenerator, benchmark_set, scene_labels,
)

N_PER_CATEGORY = 12


def _png(img: Image.Image) -> bytes:
    return img.tobytes() + repr(img.size).encode()


def _fingerprint(s: Sample):
    return ([_png(i) for i in s.images], s.question, s.answer, s.category, s.caption, repr(s.conversation))


@pytest.fixture(scope="module")
def gen():
    return SyntheticGenerator(seed=7)


@pytest.fixture(scope="module")
def by_category(gen):
    return {c: [gen.qa_sample(i, category=c) for i in range(N_PER_CATEGORY)] for c in CATEGORIES}


def test_deterministic_per_seed_and_index():
    a, b = SyntheticGenerator(seed=3), SyntheticGenerator(seed=3)
    for i in (0, 5, 123456):
        for fn in ("sample", "qa_sample", "caption_sample", "conversation_sample", "few_shot_sample"):
            assert _fingerprint(getattr(a, fn)(i)) == _fingerprint(getattr(b, fn)(i)), (fn, i)
    # random access: drawing index 9 directly equals drawing it after others
    c = SyntheticGenerator(seed=3)
    it = iter(c)
    streamed = [next(it) for _ in range(10)]
    assert _fingerprint(streamed[9]) == _fingerprint(SyntheticGenerator(seed=3).sample(9))
    other = SyntheticGenerator(seed=4)
    assert all(_fingerprint(a.sample(i))[0] != _fingerprint(other.sample(i))[0] for i in range(5))
    assert _fingerprint(a.sample(0))[0] != _fingerprint(a.sample(1))[0]


def test_every_category_has_canonical_answers(by_category):
    for cat, samples in by_category.items():
        for s in samples:
            assert s.category == cat
            assert s.question and s.answer and s.answer == s.answer.strip()
            if cat in ANSWERS:
                assert s.answer in ANSWERS[cat], (cat, s.question, s.answer)
            elif cat == "text":
                assert s.answer in WORDS or re.fullmatch(r"\d{1,3}", s.answer), s.answer
            elif cat == "chart":
                assert s.answer in CHART_LABELS or re.fullmatch(r"\d{1,3}", s.answer), s.answer
            else:  # caption: short lowercase phrase
                assert s.answer == s.answer.lower() and 2 <= len(s.answer.split()) <= 10, s.answer
            assert s.answer == s.answer.lower()


def test_images_are_rgb_and_sizes_in_range(by_category):
    for samples in by_category.values():
        for s in samples:
            for img in s.images:
                assert isinstance(img, Image.Image) and img.mode == "RGB"
                assert 96 <= img.width <= 512 and 96 <= img.height <= 512
    small = SyntheticGenerator(seed=1, image_size_range=(48, 80))
    for i in range(30):
        for img in small.sample(i).images:
            assert 48 <= img.width <= 80 and 48 <= img.height <= 80


def test_counts_match_scene(by_category):
    for s in by_category["counting"]:
        objs = s.meta["scenes"][0]["objects"]
        words = set(re.findall(r"[a-z]+", s.question.lower()))
        shape = next((x for x in SHAPES if SHAPE_PLURALS[x] in words), None)
        color = next((x for x in COLORS if x in words), None)
        n = sum((shape is None or o["shape"] == shape) and (color is None or o["color"] == color) for o in objs)
        assert str(n) == s.answer, (s.question, s.answer, n)
        assert 1 <= n <= 9


def test_ground_truth_geometry(by_category):
    for cat in ("color", "shape", "position", "yesno", "counting", "two_image"):
        for s in by_category[cat]:
            for scene in s.meta["scenes"]:
                objs = scene["objects"] or []
                for k, a in enumerate(objs):  # inside the image, never overlapping, contrasting with the background
                    assert a["r"] <= a["x"] <= scene["width"] - a["r"] and a["r"] <= a["y"] <= scene["height"] - a["r"]
                    assert a["color"] in contrasting_colors(scene["background"])
                    for b in objs[k + 1:]:
                        assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) >= a["r"] + b["r"]
    for s in by_category["position"]:
        objs = s.meta["scenes"][0]["objects"]
        if s.meta["variant"] == "zone":
            assert s.answer in ZONES and zone_of(objs[0], s.meta["scenes"][0]) == s.answer
        else:
            a, b = objs[0], objs[1]
            truth = {"left": a["x"] < b["x"], "right": a["x"] > b["x"],
                     "above": a["y"] < b["y"], "below": a["y"] > b["y"]}
            assert truth[s.answer]
    for s in by_category["color"]:
        if s.meta["variant"] == "unique_shape":
            objs = s.meta["scenes"][0]["objects"]
            assert sum(o["shape"] == objs[0]["shape"] for o in objs) == 1 and objs[0]["color"] == s.answer
    for s in by_category["chart"]:
        c = s.meta["scenes"][0]["chart"]
        assert 3 <= len(c["labels"]) <= 5 and len(set(c["values"])) >= 2
        if s.meta["variant"] == "largest":
            assert s.answer == c["labels"][int(np.argmax(c["values"]))]


def test_yes_no_is_balanced():
    g = SyntheticGenerator(seed=11)
    answers = [g.qa_sample(i, category="yesno").answer for i in range(120)]
    assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_multi_image_samples(gen, by_category):
    for s in by_category["two_image"]:
        assert len(s.images) == 2 and len(s.meta["scenes"]) == 2
        assert s.prompt().count("<image>") == 2
    for i in range(8):
        s = gen.few_shot_sample(i)
        k = s.meta["shots"]
        assert 1 <= k <= 3 and len(s.images) == k + 1
        msgs = s.messages()
        assert len(msgs) == 2 * (k + 1) and [m["role"] for m in msgs] == ["user", "assistant"] * (k + 1)
        n_img = sum(p["type"] == "image" for m in msgs for p in m["content"])
        assert n_img == len(s.images)
        assert msgs[-1]["content"][0]["text"] == s.answer
        assert s.prompt().count("<image>") == len(s.images) and not s.prompt().endswith(s.answer)
    assert len(gen.few_shot_sample(0, k=2).images) == 3


def test_conversation_and_caption(gen):
    for i in range(8):
        s = gen.conversation_sample(i)
        msgs = s.conversation
        assert len(s.images) == 1 and 4 <= len(msgs) <= 6
        assert msgs[0]["content"][0] == {"type": "image"}
        assert sum(p["type"] == "image" for m in msgs for p in m["content"]) == 1
        assert msgs[-1]["content"][0]["text"] == s.answer and s.answer
        qs = [m["content"][-1]["text"] for m in msgs if m["role"] == "user"]
        assert len(set(qs)) == len(qs)
    stage1 = SyntheticGenerator(seed=2, stage=1)
    for i in range(6):
        s = stage1.sample(i)
        assert s.category == "caption" and s.caption and s.answer == s.caption and len(s.images) == 1
        assert s.messages()[0]["content"][0] == {"type": "image"}


def test_scene_labels(by_category):
    for samples in by_category.values():
        for s in samples:
            lab = scene_labels(s)
            assert set(lab) == set(LABEL_CLASSES)
            for k, v in lab.items():
                for x in (v if isinstance(v, list) else [v]):
                    assert -1 <= x < LABEL_CLASSES[k], (k, x)
    s = by_category["counting"][0]
    assert scene_labels(s)["count"] == len(s.meta["scenes"][0]["objects"])


def test_benchmark_balanced_and_disjoint():
    bench = benchmark_set(n=len(BENCHMARK_CATEGORIES) * 4 + 2)
    counts = {c: sum(s.category == c for s in bench) for c in BENCHMARK_CATEGORIES}
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == len(bench)
    assert all(s.meta["seed"] >= TRAIN_SEED_LIMIT for s in bench)
    assert all(s.conversation is None for s in bench)
    assert _fingerprint(benchmark_set(n=3)[2]) == _fingerprint(bench[2])
    with pytest.raises(ValueError):
        benchmark_set(n=5, seed=123)


def test_categories_restrict_and_validate():
    g = SyntheticGenerator(seed=0, categories=["counting", "text"])
    assert {g.qa_sample(i).category for i in range(20)} <= {"counting", "text"}
    with pytest.raises(ValueError):
        SyntheticGenerator(seed=0, categories=["colour"])


def test_builtin_font_fallback(monkeypatch):
    """Where no TrueType font exists, Pillow's built-in font renders the text."""
    monkeypatch.setattr(render, "font_path", lambda style: None)
    render.get_font.cache_clear()
    render._text_mask_cached.cache_clear()
    try:
        s = SyntheticGenerator(seed=5).qa_sample(0, category="text")
        assert s.answer and s.images[0].getextrema() != ((0, 0),) * 3
        mask = render.text_mask("cat", "serif", 40)
        assert mask.getbbox() is not None and mask.height >= 20
    finally:
        render.get_font.cache_clear()
        render._text_mask_cached.cache_clear()


def test_lazy_package_import():
    import vlmkit.data as data

    assert data.SyntheticGenerator is SyntheticGenerator


def test_speed_smoke():
    g = SyntheticGenerator(seed=99)
    t = time.perf_counter()
    for i in range(40):
        s = g.sample(i)
        io.BytesIO(s.images[0].tobytes())
    rate = 40 / (time.perf_counter() - t)
    print(f"synthetic: {rate:.0f} samples/s")


def test_pie_chart_on_a_small_palette_still_colours_every_slice():
    # a background that leaves only 5 contrasting colours, white and black excluded for pies: fewer than 5 slices
    import numpy as np

    from vlmkit.data.synthetic.render import render_scene
    from vlmkit.data.synthetic.scenes import Canvas, chart_scene

    rng = np.random.default_rng(0)
    cv = Canvas(rng, (256, 320), "chart")
    cv.allowed = list(cv.allowed[:3]) + ["white", "black"]
    scene = chart_scene(rng, cv, kind="pie", n=5)
    assert len(scene["chart"]["colors"]) == 5
    assert render_scene(scene).size == (scene["width"], scene["height"])
