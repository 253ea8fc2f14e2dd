"""A seeded, endless generator of synthetic vision-language data (training and benchmark data of the embedded
default model).

    from vlmkit.data.synthetic import SyntheticGenerator, benchmark_set, scene_labels
    gen = SyntheticGenerator(seed=0, stage=2)
    s = gen.sample(123)              # deterministic per (seed, index): any index can be drawn directly
    s.images, s.question, s.answer   # [PIL.Image], "What color is the circle?", "red"
    s.messages()                     # chat messages (the conversation for multi-turn / few-shot samples)
    scene_labels(s)                  # small-integer class targets for vision-only pretraining

Images: shapes (``SHAPES`` x ``COLORS``, 1-12 per image, never overlapping), rendered words/numbers (``WORDS``,
0-999, several fonts, sizes, colours, slight rotation), bar/pie charts (3-5 labelled values), on flat,
gradient, textured or patterned backgrounds that always contrast with the objects, at random sizes and
aspect ratios, with random antialiasing, blur, Gaussian noise and JPEG quality 30-95.

Categories (``CATEGORIES``): color, shape, position, yesno, counting, text, chart, two_image, caption.
Answers are short and canonical: lowercase, one word or a number in digits (``"red"``, ``"circle"``,
``"left"``, ``"yes"``, ``"3"``, the word read, a chart label or value, ``"first"``/``"same"``); the
caption category answers with a short templated caption (``"a red circle and two blue squares"``).
Words are answered in lowercase whatever their rendered case.

Seeds: training uses seeds < ``TRAIN_SEED_LIMIT`` (10,000,000); :func:`benchmark_set` uses seeds above it, so the
benchmark never overlaps the training stream. Pixels depend on the fonts found on the machine (see
:mod:`vlmkit.data.synthetic.render`); the text, answers and scene descriptions do not.
"""

from .generator import (
    ANSWERS, BENCHMARK_CATEGORIES, BENCHMARK_SEED, CATEGORIES, DEFAULT_WEIGHTS, LABEL_CLASSES, SINGLE_IMAGE_CATEGORIES,
    TRAIN_SEED_LIMIT, Sample, SyntheticGenerator, benchmark_set, scene_labels,
)
from .scenes import CHART_LABELS, COLORS, POSITIONS, SHAPE_PLURALS, SHAPES, WORDS

__all__ = [
    "ANSWERS", "BENCHMARK_CATEGORIES", "BENCHMARK_SEED", "CATEGORIES", "CHART_LABELS", "COLORS", "DEFAULT_WEIGHTS",
    "LABEL_CLASSES", "POSITIONS", "SHAPE_PLURALS", "SHAPES", "SINGLE_IMAGE_CATEGORIES", "TRAIN_SEED_LIMIT", "WORDS",
    "Sample", "SyntheticGenerator", "benchmark_set", "scene_labels",
]
