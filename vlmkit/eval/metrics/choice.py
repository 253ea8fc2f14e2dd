"""Multiple-choice metrics: MMMU's response parsing and scoring, MMBench's answer matching and circular evaluation.

- `parse_multi_choice_response`, `parse_open_response`, `eval_multi_choice`, `eval_open`, `get_multi_choice_info`:
  MMMU's ``eval_utils.py`` in the form lmms-eval runs it (``lmms_eval/tasks/mmmu/utils.py``): letters in
  brackets "(A)", then "A " and "A." forms, then (for answers longer than 5 words) option text; when several
  match, the one that appears last wins; when none does, a random letter from a seeded generator.
- `mmbench_extract_choice` (= MMBench's ``can_infer``: ``can_infer_option`` then ``can_infer_text``) and
  `circular_accuracy`: MMBench's ``eval_sub_data`` / ``eval_result`` (lmms-eval ``mmbench_evals.py``): a question
  counts as right only if every circular shift of its options (rows whose index is the question's index plus a
  multiple of 1,000,000) is answered right. No LLM judge is used: an answer whose letter cannot be read is wrong
  (VLMEvalKit's "exact_matching" policy).
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import defaultdict
from typing import Iterable, Mapping, Optional, Sequence, Union

__all__ = [
    "get_multi_choice_info", "parse_multi_choice_response", "eval_multi_choice", "check_is_number",
    "normalize_str", "extract_numbers", "parse_open_response", "eval_open", "mmbench_can_infer_option",
    "mmbench_can_infer_text", "mmbench_extract_choice", "circular_accuracy", "CIRCULAR_OFFSET", "choice_letters",
    "is_missing",
]

DEFAULT_SEED = 42  # MMMU's eval_utils seeds `random` with 42
CIRCULAR_OFFSET = 1_000_000


def choice_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def get_multi_choice_info(options: Sequence[str]) -> tuple[dict, list]:
    """(index2ans, all_choices) for a list of option texts: {"A": options[0], ...}, ["A", "B", ...]."""
    letters = choice_letters(len(options))
    return dict(zip(letters, options)), letters


def _rng(rng) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    return random.Random(DEFAULT_SEED if rng is None else rng)


def parse_multi_choice_response(response: str, all_choices: Sequence[str], index2ans: Mapping[str, str],
                                rng: Union[random.Random, int, str, None] = None) -> str:
    """The letter a free-form response picks (MMMU `parse_multi_choice_response`, lmms-eval's version).

    `rng`: the generator for the random fallback (a `random.Random`, or a seed; default seed 42), so the result
    of an unreadable response is reproducible."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "  # spaces avoid partial matches

    index_ans = True
    ans_with_brack = False
    candidates = []
    for choice in all_choices:  # (A) (B) (C) (D)
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if not candidates:
        for choice in all_choices:  # A B C D
            if f"{choice} " in response:
                candidates.append(choice)
    if not candidates:
        for choice in all_choices:  # A. B. C. D.
            if f"{choice}." in response:
                candidates.append(choice)
    # Still nothing and the response is longer than 5 words: look for an option's text.
    if not candidates and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if str(ans).lower() in response.lower():
                candidates.append(index)
                index_ans = False

    if not candidates:
        return _rng(rng).choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    starts = []
    for can in candidates:
        if not index_ans:
            starts.append(response.lower().rfind(str(index2ans[can]).lower()))
        elif ans_with_brack:
            starts.append(response.rfind(f"({can})"))
        else:
            starts.append(response.rfind(f" {can} "))
    # The last one; ties (e.g. all -1) go to the earliest candidate, as numpy's argmax does.
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]


def eval_multi_choice(gold: Union[str, Sequence[str]], pred: str) -> bool:
    """MMMU `eval_multi_choice`: the parsed letter equals the gold letter (or one of several)."""
    if isinstance(gold, (list, tuple)):
        return any(g == pred for g in gold)
    return gold == pred


# --------------------------------------------------------------------------------------- open questions

def check_is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(text: str) -> list:
    """MMMU `normalize_str`: a number becomes [round(float, 2)]; a string is lowercased, and a one-character
    string becomes [" x", "x "] to avoid trivial substring matches."""
    text = text.strip()
    if check_is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]
    return [text]


def extract_numbers(text: str) -> list[str]:
    """MMMU `extract_numbers`: numbers with thousands commas, in scientific notation, then plain ones."""
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + simple


def parse_open_response(response: str) -> list:
    """MMMU `parse_open_response`: the key sub-responses (the text after "is", "so", "answer", ... or "=" in the
    last sentence), plus every number in them, normalised with `normalize_str`, without duplicates."""
    def key_subresponses(response: str) -> list[str]:
        response = response.strip().strip(".").lower()
        sub_responses = re.split(r"\.\s(?=[A-Z])|\n", response)
        indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
        keys = []
        for index, resp in enumerate(sub_responses):
            if index == len(sub_responses) - 1:
                indicators.extend(["="])
            shortest = None
            for indicator in indicators:
                if indicator in resp:
                    tail = resp.split(indicator)[-1].strip()
                    if not shortest or len(tail) < len(shortest):
                        shortest = tail
            if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
                keys.append(shortest)
        return keys or [response]

    keys = key_subresponses(response)
    preds = list(keys)
    for resp in keys:
        preds.extend(extract_numbers(resp))
    out = []
    for p in preds:
        out.extend(normalize_str(p))
    seen, unique = set(), []
    for p in out:  # the reference's list(set(...)) without its arbitrary order
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def eval_open(gold: Union[str, Sequence[str]], pred: list) -> bool:
    """MMMU `eval_open`: a parsed string is right when a normalised gold string occurs in it; a parsed number
    when it equals a normalised gold number."""
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    norm_answers = []
    for answer in golds:
        norm_answers.extend(normalize_str(str(answer)))
    for p in pred:
        if isinstance(p, str):
            if any(isinstance(a, str) and a in p for a in norm_answers):
                return True
        elif p in norm_answers:
            return True
    return False


# ----------------------------------------------------------------------------------------------- MMBench

def is_missing(value) -> bool:
    """An absent option in MMBench tables: None, NaN, "" or the string "nan"."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() in ("", "nan")


def mmbench_can_infer_option(answer: str, num_choice: int = 5) -> Union[str, bool]:
    """MMBench `can_infer_option`: the one letter written alone ("B"), or in exactly one of the forms "B." "B,"
    "B:" "B)" "B)." "(B)" "(B)." ":B" ":B," ":B." ":B)" ":B).". A lone "A" in an answer of more than 3 words may
    be the article, so it is not taken in the first step. False when no single letter is found."""
    choices = string.ascii_uppercase[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return False

    def count(splits, prefix="", suffix=""):
        return sum(1 for c in choices if prefix + c + suffix in splits)

    splits = [x.strip() for x in answer.split()]
    if count(splits) == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break
            if ch in splits:
                return ch
    forms = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
             (":", "."), (":", ")"), (":", ").")]
    for prefix, suffix in forms:
        if count(splits, prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return False


def mmbench_can_infer_text(answer: str, choices: Mapping[str, str]) -> Union[str, bool]:
    """MMBench `can_infer_text`: the one option whose text occurs in the answer (case-insensitive)."""
    answer = answer.lower()
    found = [k for k, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else False


def mmbench_extract_choice(answer: str, choices: Mapping[str, str]) -> Optional[str]:
    """MMBench `can_infer`: the letter read from the answer, else the option whose text it contains; None when
    neither works (the reference would then ask an LLM; here such an answer is wrong)."""
    choices = {k: v for k, v in choices.items() if not is_missing(v)}
    letter = mmbench_can_infer_option(str(answer))
    if not letter:
        letter = mmbench_can_infer_text(str(answer), choices)
    return letter or None


def circular_accuracy(records: Iterable[Mapping], index_key: str = "index", correct_key: str = "correct",
                      offset: int = CIRCULAR_OFFSET) -> tuple[float, dict]:
    """MMBench circular evaluation. Each record has an integer index and a truth value `correct`; the records
    whose index is i + k * offset (k = 0, 1, 2...) are the circular shifts of question i, and question i counts
    only if all of them are correct. Returns (accuracy over questions, {question index: 0 or 1})."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[int(r[index_key]) % offset].append(bool(r[correct_key]))
    hits = {idx: int(all(v)) for idx, v in sorted(groups.items())}
    return (sum(hits.values()) / len(hits) if hits else 0.0), hits
