"""Open-answer VQA metrics: VQAv2 / TextVQA accuracy, ANLS (DocVQA), ChartQA relaxed accuracy, exact match.

Each function scores ONE prediction against its gold answer(s) and follows a public reference line by line:

- `vqa_normalize` / `process_punctuation` / `process_digit_article`: the official VQA evaluation script
  (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``: punctuation list, comma/period rules,
  ``manualMap`` number words -> digits, articles, the contraction table).
- `evalai_normalize`: the EvalAI answer processor (facebookresearch/mmf ``EvalAIAnswerProcessor``, used by
  lmms-eval for VQAv2 and TextVQA): lowercase, drop "," and "?", split "'s", then the two steps above.
- `vqav2_accuracy`: lmms-eval ``vqav2_process_results``; `textvqa_accuracy`: lmms-eval
  ``textvqa_process_results``. Both: mean over the leave-one-out subsets of the gold answers of
  ``min(1, matches / 3)``.
- `anls`: the DocVQA / InfographicVQA RRC script (as lmms-eval's ``anls`` metric): 1 - normalised Levenshtein
  distance to the closest gold answer, 0 when below the 0.5 threshold.
- `relaxed_correctness`: ChartQA (Masry et al. 2022, section 5.1, as in pix2struct / Qwen-VL / lmms-eval):
  numbers within 5% relative error, a trailing "%" read as x/100, otherwise case-insensitive exact match.

The functions score the text they are given: the runner strips the model's output first, as lmms-eval's model
wrappers do, so callers scoring raw generations should strip them too.
"""

from __future__ import annotations

import re
import string
from typing import Iterable, Optional, Sequence, Union

__all__ = [
    "CONTRACTIONS", "NUMBER_MAP", "ARTICLES", "PUNCTUATIONS", "process_punctuation", "process_digit_article",
    "vqa_normalize", "evalai_normalize", "vqa_leave_one_out", "vqav2_accuracy", "textvqa_accuracy", "levenshtein",
    "anls", "relaxed_correctness", "exact_match",
]

# ------------------------------------------------------------------------------------- official VQA tables

# The contraction table of the official script (straight-quote version, as in vqaEval.py on master and in EvalAI).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# `manualMap` of the official script: number words up to ten (and "none") become digits.
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
# "(?!<=\d)" is the reference's own (mistyped) look-behind: it is a look-AHEAD that never matches "<=digit", so a
# period is dropped unless a digit follows it ("3.5" keeps it, "yes." and "5." lose it). Kept as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # official script
_EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")  # EvalAI processor
# The reference passes re.UNICODE (32) where `Pattern.sub` takes `count`: at most 32 periods are removed.
_PERIOD_COUNT = 32


def process_punctuation(text: str, comma_strip: re.Pattern = _COMMA_STRIP) -> str:
    """`processPunctuation` of the official script: a punctuation mark next to a space (or any text with a
    digit,digit comma) is deleted, otherwise replaced by a space; periods not followed by a digit are deleted."""
    out = text
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or comma_strip.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """`processDigitArticle` of the official script: lowercase, number words -> digits, articles dropped,
    contractions restored ("dont" -> "don't"), words joined by single spaces."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """The official script's answer processing: newlines/tabs to spaces, strip, punctuation, digits/articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def evalai_normalize(text: str) -> str:
    """EvalAI's answer processor (mmf `EvalAIAnswerProcessor.__call__`), as lmms-eval applies it."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()  # word_tokenize
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text, _EVALAI_COMMA_STRIP)
    return process_digit_article(text)


def _answer_texts(answers) -> list[str]:
    """Gold answers as strings: a string, a list of strings, or VQAv2's list of {"answer": ...} dicts."""
    if answers is None:
        return []
    if isinstance(answers, (str, int, float)):
        return [str(answers)]
    out = []
    for a in answers:
        out.append(str(a["answer"]) if isinstance(a, dict) else str(a))
    return out


def vqa_leave_one_out(prediction: str, golds: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of `golds` of min(1, #matches / 3); strings compared as given.

    With 10 answers this is the VQA accuracy: 3 or more other annotators agreeing earn full credit. A single gold
    answer (not VQA-style data) would always score 0 under the formula; it scores plain equality instead."""
    golds = list(golds)
    if not golds:
        return 0.0
    if len(golds) == 1:
        return float(prediction == golds[0])
    scores = []
    for i in range(len(golds)):
        matches = sum(1 for j, g in enumerate(golds) if j != i and g == prediction)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def vqav2_accuracy(prediction: str, answers) -> float:
    """VQAv2 accuracy of one prediction, as lmms-eval's `vqav2_process_results` (the official rules):

    the prediction goes through the EvalAI processor; gold answers are stripped, and only when they disagree
    (more than one distinct answer) are both sides put through the official punctuation + digit/article steps.
    As in the reference, unanimous gold answers are compared unnormalised (the annotation files are already
    normalised). `answers`: 10 strings or VQAv2's [{"answer": ...}, ...]."""
    pred = evalai_normalize(prediction)
    golds = [g.replace("\n", " ").replace("\t", " ").strip() for g in _answer_texts(answers)]
    if len(set(golds)) > 1:
        golds = [process_digit_article(process_punctuation(g)) for g in golds]
        pred = process_digit_article(process_punctuation(pred))
    return vqa_leave_one_out(pred, golds)


def textvqa_accuracy(prediction: str, answers) -> float:
    """TextVQA accuracy (lmms-eval `textvqa_process_results`): the EvalAI processor on the prediction and on
    every gold answer, then the leave-one-out VQA accuracy."""
    pred = evalai_normalize(prediction)
    return vqa_leave_one_out(pred, [evalai_normalize(g) for g in _answer_texts(answers)])


# --------------------------------------------------------------------------------------------------- ANLS

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (DocVQA / InfographicVQA RRC script, lmms-eval
    `anls`): both sides lowercased with whitespace collapsed; for each gold answer
    NL = distance / max(len(gold), len(prediction)); score = 1 - min NL, and 0 when that is below `threshold`
    (a score of exactly 0.5 is kept). As in the reference, the lengths are those of the strings before
    whitespace normalisation. No gold answers: 0."""
    golds = _answer_texts(answers)
    if not golds:
        return 0.0
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in golds:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


# ------------------------------------------------------------------------------------------------ ChartQA

def _to_float(text: str) -> Optional[float]:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0  # "x%" is read as x/100
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: Union[str, Sequence[str]], max_relative_change: float = 0.05
                        ) -> float:
    """ChartQA relaxed accuracy of one prediction: 1.0 when both parse as numbers and
    |pred - target| / |target| <= 5%, else case-insensitive exact match. As in the reference, a target of 0
    (where the relative change is undefined) falls back to exact string match, so "0" matches only "0".
    A list of targets scores the best one."""
    if not isinstance(target, str):
        return max((relaxed_correctness(prediction, t, max_relative_change) for t in target), default=0.0)
    pred_f, target_f = _to_float(prediction), _to_float(target)
    if pred_f is not None and target_f:
        return float(abs(pred_f - target_f) / abs(target_f) <= max_relative_change)
    return float(prediction.lower() == target.lower())


# ------------------------------------------------------------------------------------------- exact match

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, target: Union[str, Iterable[str]], ignore_case: bool = True,
                ignore_punctuation: bool = True) -> float:
    """1.0 when the prediction equals the target (or any of several targets), as Hugging Face `evaluate`'s
    exact_match with `ignore_case` / `ignore_punctuation` (ASCII punctuation removed), after stripping
    surrounding whitespace and collapsing inner runs of whitespace."""
    def norm(s: str) -> str:
        s = str(s)
        if ignore_case:
            s = s.lower()
        if ignore_punctuation:
            s = s.translate(_PUNCT_TABLE)
        return " ".join(s.split())

    targets = [target] if isinstance(target, str) else list(target)
    p = norm(prediction)
    return float(any(p == norm(t) for t in targets))
