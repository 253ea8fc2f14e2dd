"""Captioning metrics: BLEU-1..4 and CIDEr-D as the COCO caption toolkit computes them.

Follows ``pycocoevalcap`` (tylin/coco-caption): ``bleu/bleu_scorer.py`` (corpus BLEU with the "closest" reference
length, clipped n-gram counts, the 1e-9 / 1e-15 smoothing constants, per-caption scores as in its score list) and
``cider/cider_scorer.py`` (CIDEr-D: tf-idf n-gram vectors with document frequencies over the references of the
whole corpus, clipped cosine similarity, a Gaussian length penalty with sigma = 6, mean over n = 1..4, divided
by the number of references, times 10). One detail is kept as the reference has it: the "length" in the CIDEr-D
penalty counts the caption's bigrams, not its words.

The toolkit tokenizes with the Stanford PTB tokenizer (Java) and drops punctuation tokens. `tokenize` is a pure
Python stand-in with the same effect on ordinary captions (lowercase; clitics split as "do n't", "dog 's";
punctuation, quotes and brackets removed; hyphenated words and decimals kept); pass `tokenize=False` to score
text that is already tokenized.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Sequence

__all__ = ["tokenize", "bleu", "bleu4", "cider_d"]

_PUNCT_TOKENS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                 ";"}
_BRACKETS_QUOTES = set("()[]{}\"")  # PTB writes these as -LRB- ... / `` '' and the filter drops them
_CLITICS = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'m|'ll|'d)\b")
# A word: letters/digits with inner hyphens, periods (3.5, u.s), apostrophes, or a single other character.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|m|ll|d)\b|\w+(?:[-.'&/]\w+)*|\S")


def tokenize(text: str) -> list[str]:
    """Caption text -> lowercase tokens without punctuation (a stand-in for PTBTokenizer + its filter)."""
    text = str(text).replace("\n", " ").lower()
    text = _CLITICS.sub(r"\1 \2", text)
    tokens = _TOKEN.findall(text)
    return [t for t in tokens if t not in _PUNCT_TOKENS and t not in _BRACKETS_QUOTES]


def _ngrams(words: Sequence[str], n: int = 4) -> dict:
    counts: dict = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _words(text, do_tokenize: bool) -> list[str]:
    return tokenize(text) if do_tokenize else str(text).split()


def _check(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for refs in references:
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError("each prediction needs a non-empty list of reference captions")


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, tokenize: bool = True
         ) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n (coco-caption `Bleu(4).compute_score`): ([corpus BLEU-k for k = 1..n],
    [[per-caption BLEU-k, one per caption] for k = 1..n]). Scores are in [0, 1]."""
    _check(predictions, references)
    small, tiny = 1e-9, 1e-15
    total_guess, total_correct = [0] * n, [0] * n
    total_test = total_ref = 0.0
    per_caption: list[list[float]] = [[] for _ in range(n)]
    for pred, refs in zip(predictions, references):
        ref_lens, max_counts = [], {}
        for ref in refs:
            words = _words(ref, tokenize)
            ref_lens.append(len(words))
            for gram, count in _ngrams(words, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        words = _words(pred, tokenize)
        test_len = len(words)
        ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]  # "closest"
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        total_test += test_len
        total_ref += ref_len
        score = 1.0
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
            score *= (correct[k] + tiny) / (guess[k] + small)
            per_caption[k].append(score ** (1.0 / (k + 1)))
        ratio = (test_len + tiny) / (ref_len + small)
        if ratio < 1:
            for k in range(n):
                per_caption[k][-1] *= math.exp(1 - 1 / ratio)
    corpus, score = [], 1.0
    for k in range(n):
        score *= (total_correct[k] + tiny) / (total_guess[k] + small)
        corpus.append(score ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        corpus = [b * math.exp(1 - 1 / ratio) for b in corpus]
    return corpus, per_caption


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: bool = True) -> float:
    """Corpus BLEU-4 (coco-caption "Bleu_4"), in [0, 1]."""
    return bleu(predictions, references, 4, tokenize)[0][3]


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> tuple[float, list[float]]:
    """CIDEr-D (coco-caption `Cider().compute_score`): (corpus score = mean of the per-caption scores, [per-caption
    scores]). Document frequencies come from the references of all the captions passed together, so score a
    whole test set in one call. A perfect caption scores about 10 on a large corpus; papers print x100."""
    _check(predictions, references)
    tests = [_ngrams(_words(p, tokenize), n) for p in predictions]
    refs = [[_ngrams(_words(r, tokenize), n) for r in rs] for rs in references]
    doc_freq: dict = defaultdict(float)
    for rs in refs:
        for gram in {g for r in rs for g in r}:
            doc_freq[gram] += 1
    log_ref_len = math.log(float(len(refs)))

    def vector(counts):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            df = math.log(max(1.0, doc_freq[gram]))
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_ref_len - df)
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # the reference counts bigrams as the length
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def sim(vh, vr, nh, nr, lh, lr):
        delta = float(lh - lr)
        val = [0.0] * n
        for k in range(n):
            for gram, value in vh[k].items():
                val[k] += min(value, vr[k].get(gram, 0.0)) * vr[k].get(gram, 0.0)
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta ** 2) / (2 * sigma ** 2))
        return val

    scores = []
    for test, rs in zip(tests, refs):
        vh, nh, lh = vector(test)
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vector(r)
            total = [a + b for a, b in zip(total, sim(vh, vr, nh, nr, lh, lr))]
        scores.append(sum(total) / n / len(rs) * 10.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores
