"""Benchmark metrics, each following the reference implementation the field reports numbers with.

    from vlmkit.eval import metrics
    metrics.vqav2_accuracy("Two", ["2"] * 10)                 # 1.0   (VQAv2, official normalisation)
    metrics.textvqa_accuracy("coca cola", answers)           # TextVQA (EvalAI answer processor)
    metrics.anls("hello wrld", ["hello world"])              # 0.909 (DocVQA ANLS, threshold 0.5)
    metrics.relaxed_correctness("10.4", "10")                # 1.0   (ChartQA, 5% tolerance)
    metrics.parse_multi_choice_response("(B) cat", ["A", "B"], {"A": "dog", "B": "cat"})   # "B"  (MMMU)
    metrics.circular_accuracy(rows)                          # MMBench circular evaluation
    metrics.exact_match("Red.", "red")                       # 1.0
    metrics.cider_d(preds, refs)[0], metrics.bleu4(preds, refs)   # COCO caption CIDEr-D, BLEU-4

The definitions live in `vqa` (open answers), `choice` (multiple choice) and `caption` (captioning); their
docstrings name the reference each one follows. `ITEM_METRICS` / `CORPUS_METRICS` map the names a task spec may
use to the functions.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .caption import bleu, bleu4, cider_d, tokenize
from .choice import (
    CIRCULAR_OFFSET, check_is_number, choice_letters, circular_accuracy, eval_multi_choice, eval_open,
    extract_numbers, get_multi_choice_info, is_missing, mmbench_can_infer_option, mmbench_can_infer_text,
    mmbench_extract_choice, normalize_str, parse_multi_choice_response, parse_open_response,
)
from .vqa import (
    ARTICLES, CONTRACTIONS, NUMBER_MAP, PUNCTUATIONS, anls, evalai_normalize, exact_match, levenshtein,
    process_digit_article, process_punctuation, relaxed_correctness, textvqa_accuracy, vqa_leave_one_out,
    vqa_normalize, vqav2_accuracy,
)

# Per-item metrics: f(prediction: str, target) -> float in [0, 1]; a task's score is their mean.
ITEM_METRICS: dict[str, Callable[..., float]] = {
    "vqav2": vqav2_accuracy,
    "vqa": vqav2_accuracy,
    "textvqa": textvqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_correctness,
    "chartqa": relaxed_correctness,
    "exact_match": exact_match,
}


def _cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return cider_d(predictions, references)[0]


# Corpus metrics: f(predictions, [[reference, ...], ...]) -> float (computed over the whole set at once).
CORPUS_METRICS: dict[str, Callable[..., float]] = {"cider": _cider, "bleu4": bleu4}

METRIC_NAMES = sorted(set(ITEM_METRICS) | set(CORPUS_METRICS) | {"multiple_choice"})

__all__ = [
    "ITEM_METRICS", "CORPUS_METRICS", "METRIC_NAMES",
    # open answers
    "vqav2_accuracy", "textvqa_accuracy", "vqa_leave_one_out", "vqa_normalize", "evalai_normalize",
    "process_punctuation", "process_digit_article", "CONTRACTIONS", "NUMBER_MAP", "ARTICLES", "PUNCTUATIONS",
    "anls", "levenshtein", "relaxed_correctness", "exact_match",
    # multiple choice
    "parse_multi_choice_response", "get_multi_choice_info", "eval_multi_choice", "parse_open_response", "eval_open",
    "normalize_str", "extract_numbers", "check_is_number", "mmbench_extract_choice", "mmbench_can_infer_option",
    "mmbench_can_infer_text", "circular_accuracy", "CIRCULAR_OFFSET", "choice_letters", "is_missing",
    # captions
    "cider_d", "bleu", "bleu4", "tokenize",
]
