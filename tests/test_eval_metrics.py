"""vlmkit.eval.metrics against worked examples of each reference definition (see the module docstrings for the
references: the official VQA script, EvalAI, the DocVQA RRC script, ChartQA, MMMU, MMBench, coco-caption)."""

import math
import random

import pytest

from vlmkit.eval import metrics as M

# ------------------------------------------------------------------------------------ VQA normalisation


@pytest.mark.parametrize("text, expected", [
    ("yes.", "yes"),                     # a period not followed by a digit goes
    ("3.5", "3.5"),                      # ... one followed by a digit stays
    ("t-shirt", "t shirt"),              # punctuation inside a word becomes a space
    ("no, thanks", "no thanks"),         # ... and next to a space it is deleted
    ("1,000", "1000"),                   # digit,digit commas: every punctuation mark is deleted
    ("The Two dogs!", "2 dogs"),         # lowercase, number words -> digits, articles dropped
    ("an apple", "apple"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),                # manualMap stops at ten
    ("dont", "don't"),                   # the contraction table
    ("isnt it", "isn't it"),
    ("Im", "im"),                        # the table's "Im" never matches: words are lowercased first
    ("  two\tcats\n", "2 cats"),
    ("", ""),
])
def test_official_vqa_normalisation(text, expected):
    assert M.vqa_normalize(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("What's that?", "what 's that"),    # EvalAI: lowercase, drop "?" and ",", split "'s"
    ("Coca-Cola", "coca cola"),
    ("1,000,000", "1000000"),
    ("Three", "3"),
    ("The End.", "end"),
])
def test_evalai_processor(text, expected):
    assert M.evalai_normalize(text) == expected


def test_contraction_table_is_the_official_one():
    assert len(M.CONTRACTIONS) == 120 and M.CONTRACTIONS["yall'd've"] == "y'all'd've"
    assert M.NUMBER_MAP == {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


# ------------------------------------------------------------------------------------ VQAv2 / TextVQA

@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqav2_accuracy_leave_one_out(matches, expected):
    # With k of 10 answers matching: the k subsets that leave a match out see k-1 matches, the others k:
    # (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert M.vqav2_accuracy("cat", answers) == pytest.approx(expected)


def test_vqav2_accuracy_normalises_the_prediction():
    assert M.vqav2_accuracy("Two", ["2"] * 10) == 1.0          # number word -> digit
    assert M.vqav2_accuracy("two.", ["2"] * 9 + ["3"]) == 1.0
    assert M.vqav2_accuracy("Yes!", [{"answer": "yes", "answer_id": i} for i in range(10)]) == 1.0
    assert M.vqav2_accuracy("A red apple", ["red apple"] * 10) == 1.0
    assert M.vqav2_accuracy("", ["yes"] * 10) == 0.0            # empty prediction
    assert M.vqav2_accuracy("yes", []) == 0.0                   # no gold answers


def test_vqav2_unanimous_answers_are_compared_unnormalised_as_the_reference_does():
    assert M.vqav2_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0   # pred -> "t shirt", gold stays "t-shirt"
    assert M.vqav2_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0  # disagreeing: both normalised


def test_vqa_single_gold_answer_is_plain_equality():
    assert M.vqav2_accuracy("Yes", ["yes"]) == 1.0 and M.vqav2_accuracy("no", ["yes"]) == 0.0


def test_textvqa_accuracy():
    assert M.textvqa_accuracy("Ten", ["10"] * 10) == 1.0
    assert M.textvqa_accuracy("Coca-Cola", ["coca cola"] * 5 + ["coca-cola"] * 5) == 1.0  # gold normalised too
    assert M.textvqa_accuracy("10", ["10", "10", "ten"] + ["11"] * 7) == pytest.approx(0.9)
    assert M.textvqa_accuracy("STOP", ["stop"] * 2 + ["go"] * 8) == pytest.approx(0.6)
    assert M.textvqa_accuracy("", ["stop"] * 10) == 0.0


# --------------------------------------------------------------------------------------------- ANLS

def test_anls_worked_examples():
    assert M.anls("hello wrld", ["hello world"]) == pytest.approx(10 / 11)
    assert M.anls("hello wrld", ["goodbye", "hello world"]) == pytest.approx(10 / 11)   # max over gold answers
    assert M.anls("  Hello   World ", ["hello world"]) == 1.0                           # case and spaces ignored
    assert M.anls("", ["abc"]) == 0.0 and M.anls("abc", []) == 0.0 and M.anls("", [""]) == 1.0
    assert M.anls("42", "42") == 1.0                                                     # one answer as a string


def test_anls_threshold():
    assert M.anls("abcd", ["abef"]) == 0.5                        # exactly 0.5 is kept, as in the RRC script
    assert M.anls("abcdefXXXXX", ["abcdefghijk"]) == pytest.approx(1 - 5 / 11)   # 0.545: kept
    assert M.anls("abcdeXXXXXX", ["abcdefghijk"]) == 0.0          # 0.4545: below the threshold
    assert M.anls("abcdeXXXXXX", ["abcdefghijk"], threshold=0.4) == pytest.approx(1 - 6 / 11)


def test_anls_lengths_are_taken_before_whitespace_normalisation():
    # distance("ab c", "abc") = 1, over max(len("abc"), len("ab  c")) = 5, as the reference computes it
    assert M.anls("ab  c", ["abc"]) == pytest.approx(0.8)


def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3 and M.levenshtein("", "abc") == 3 and M.levenshtein("a", "a") == 0


# ------------------------------------------------------------------------------------------ ChartQA

@pytest.mark.parametrize("pred, target, expected", [
    ("10.5", "10", 1.0),        # exactly 5%
    ("10.6", "10", 0.0),
    ("9.5", "10", 1.0),
    ("-10.4", "-10", 1.0),
    ("45%", "0.45", 1.0),       # "x%" is read as x / 100 ...
    ("45", "45%", 0.0),         # ... on either side
    ("45%", "45%", 1.0),
    ("0", "0", 1.0),            # a 0 target: exact string match only
    ("0.0", "0", 0.0),
    ("0%", "0", 0.0),
    ("1e1", "10", 1.0),
    ("Blue", "blue", 1.0),      # non-numbers: case-insensitive exact match
    ("blue bar", "blue", 0.0),
    ("", "", 1.0),
    ("", "12", 0.0),
])
def test_chartqa_relaxed_correctness(pred, target, expected):
    assert M.relaxed_correctness(pred, target) == expected


def test_chartqa_several_targets_take_the_best():
    assert M.relaxed_correctness("3", ["7", "3.1"]) == 1.0


# -------------------------------------------------------------------------------------- exact match

def test_exact_match():
    assert M.exact_match("Red.", "red") == 1.0
    assert M.exact_match("Red.", "red", ignore_punctuation=False) == 0.0
    assert M.exact_match("red", "Red", ignore_case=False) == 0.0
    assert M.exact_match(" a  red   circle ", "a red circle") == 1.0
    assert M.exact_match("red", ["blue", "red"]) == 1.0
    assert M.exact_match("", "red") == 0.0 and M.exact_match("", "") == 1.0


# ------------------------------------------------------------------------------------- MMMU parsing

LETTERS = ["A", "B", "C", "D"]
ANIMALS = {"A": "dog", "B": "cat", "C": "cow", "D": "fish"}


@pytest.mark.parametrize("response, expected", [
    ("(B)", "B"),
    ("B", "B"),
    ("A.", "A"),                                        # "." stripped, then the "A " form
    ("Answer: D.", "D"),
    ("(A) is wrong, the answer is (C)", "C"),          # brackets win, and the last one
    ("A or B? I would choose B", "B"),                 # several letters: the last one
    ("The correct option is C because", "C"),
    ("I am quite sure that this shows a cat", "B"),    # > 5 words, no letter: the option text
    ("not the dog but the cat is in the picture", "B"),  # several option texts: the last one
    ("DNA is key", "A"),                               # the reference's "A " form matches inside words
])
def test_mmmu_parse_multi_choice_response(response, expected):
    assert M.parse_multi_choice_response(response, LETTERS, ANIMALS) == expected


def test_mmmu_random_fallback_is_seeded():
    # "cat" alone is too short for option-text matching: a random letter, reproducible from the seed.
    picks = [M.parse_multi_choice_response("cat", LETTERS, ANIMALS, rng=s) for s in range(40)]
    assert picks == [M.parse_multi_choice_response("cat", LETTERS, ANIMALS, rng=s) for s in range(40)]
    assert set(picks) == set(LETTERS)
    assert M.parse_multi_choice_response("", LETTERS, ANIMALS) == random.Random(42).choice(LETTERS)
    rng = random.Random(7)
    assert M.parse_multi_choice_response("", LETTERS, ANIMALS, rng=rng) in LETTERS


def test_mmmu_choice_info_and_eval():
    index2ans, letters = M.get_multi_choice_info(["x", "y", "z"])
    assert letters == ["A", "B", "C"] and index2ans == {"A": "x", "B": "y", "C": "z"}
    assert M.eval_multi_choice("B", "B") and not M.eval_multi_choice("B", "C")
    assert M.eval_multi_choice(["A", "C"], "C")


def test_mmmu_open_questions():
    # the key part after "is", then its numbers; the reference's plain-number pattern also finds "234"
    assert M.parse_open_response("The result is 1,234.") == [1234.0, 234.0]
    assert M.eval_open("1234", M.parse_open_response("The result is 1,234."))
    assert M.eval_open("3.14", M.parse_open_response("so the answer is 3.14159"))  # numbers rounded to 2 places
    assert M.eval_open("Paris", M.parse_open_response("I think it is Paris"))
    assert not M.eval_open("London", M.parse_open_response("I think it is Paris"))
    assert M.eval_open(["4", "four"], M.parse_open_response("2 + 2 = 4"))
    assert M.normalize_str("b") == [" b", "b "] and M.normalize_str("1,000.456") == [1000.46]
    assert M.extract_numbers("x = -7 or 3.5") == ["-7", "3.5"]
    # the reference's three patterns run independently, so parts of a number come out again
    assert M.extract_numbers("1,000 and 2.5e3") == ["1,000", "2.5e3", "000", "2", "3"]


# ---------------------------------------------------------------------------------------- MMBench

@pytest.mark.parametrize("answer, expected", [
    ("B", "B"),
    ("The answer is B", "B"),
    ("B) dog", "B"),
    ("(C).", "C"),
    ("Answer:D", False),                    # ":D" must stand alone
    ("A dog is here", False),               # a lone "A" in a longer answer may be the article
    ("A and B", False),                     # two letters
    ("no letter here", False),
])
def test_mmbench_can_infer_option(answer, expected):
    assert M.mmbench_can_infer_option(answer) == expected


def test_mmbench_extract_choice_falls_back_to_option_text():
    choices = {"A": "cat", "B": "dog", "C": "nan"}
    assert M.mmbench_extract_choice("A dog is here", choices) == "B"
    assert M.mmbench_extract_choice("It is a Cat", choices) == "A"
    assert M.mmbench_extract_choice("a cat and a dog", choices) is None     # two options named
    assert M.mmbench_extract_choice("nothing useful", choices) is None


def test_circular_accuracy_needs_every_shift_right():
    rows = [{"index": 0, "correct": True}, {"index": 1_000_000, "correct": True}, {"index": 2_000_000, "correct": True},
            {"index": 1, "correct": True}, {"index": 1_000_001, "correct": False},
            {"index": 2, "correct": False}]
    accuracy, hits = M.circular_accuracy(rows)
    assert hits == {0: 1, 1: 0, 2: 0} and accuracy == pytest.approx(1 / 3)
    assert M.circular_accuracy([]) == (0.0, {})


# --------------------------------------------------------------------------------------- captions

PREDS = ["a man riding a horse on the beach", "two dogs playing in the grass", "a plate of food"]
REFS = [["a man rides a horse along the beach", "a person riding a horse on a beach",
         "a man on a horse near the ocean"],
        ["two dogs play on the grass", "a pair of dogs running in a field"],
        ["a plate with food on it", "a dish of food on a table"]]


def test_caption_metrics_match_pycocoevalcap():
    # Values printed by pycocoevalcap 1.2 (Bleu(4), Cider()) on this corpus (already tokenized).
    corpus, per_caption = M.bleu(PREDS, REFS, tokenize=False)
    assert corpus == pytest.approx([0.8451260213418907, 0.673610566188147, 0.40750899204366764, 0.2864036406274583],
                                   rel=1e-12)
    assert per_caption[3] == pytest.approx([0.4671379775957057, 1.2909944482140289e-08, 1.457378791056803e-08],
                                           rel=1e-9)
    assert M.bleu4(PREDS, REFS) == pytest.approx(0.2864036406274583, rel=1e-12)
    score, scores = M.cider_d(PREDS, REFS, tokenize=False)
    assert score == pytest.approx(2.246645717630918, rel=1e-12)
    assert scores == pytest.approx([3.0493767032856396, 1.8109720640490767, 1.8795883855580366], rel=1e-12)


def test_cider_d_by_hand():
    # Two images; idf = log(2) - log(df): "a" is in both reference sets (idf 0), every other n-gram in one (log 2).
    # Image 1, "a b c" vs "a b c d": cosine sqrt(2/3) for 1- and 2-grams, 1/sqrt(2) for 3-grams, 0 for 4-grams;
    # the length penalty counts bigrams (2 vs 3): exp(-1 / (2 * 6^2)). Image 2 shares nothing: 0.
    score, scores = M.cider_d(["a b c", "q"], [["a b c d"], ["a x y z"]], tokenize=False)
    expected = 10 * math.exp(-1 / 72) * (2 * math.sqrt(2 / 3) + 1 / math.sqrt(2)) / 4
    assert scores[0] == pytest.approx(expected, rel=1e-12) and scores[1] == 0.0
    assert score == pytest.approx(expected / 2, rel=1e-12)
    # A caption equal to its only reference, with every n-gram unique to it, scores 10.
    assert M.cider_d(["a b c d", "x"], [["a b c d"], ["y"]])[1][0] == pytest.approx(10.0)


def test_bleu_by_hand():
    # "the cat" vs "the cat sat on the mat": 1- and 2-gram precisions are 1, brevity penalty exp(1 - 6/2).
    corpus, _ = M.bleu(["the cat"], [["the cat sat on the mat"]])
    assert corpus[0] == pytest.approx(math.exp(-2)) and corpus[1] == pytest.approx(math.exp(-2))
    assert corpus[3] < 1e-3                                      # no 3- or 4-grams: only the smoothing constants
    assert M.bleu4(["the cat sat on the mat"], [["the cat sat on the mat", "a cat"]]) == pytest.approx(1.0)


def test_caption_tokenizer_and_input_checks():
    assert M.tokenize('A man\'s dog, running (fast) on the "beach".') == [
        "a", "man", "'s", "dog", "running", "fast", "on", "the", "beach"]
    assert M.tokenize("I don't know... 3.5 t-shirts!") == ["i", "do", "n't", "know", "3.5", "t-shirts"]
    # tokenization makes case and punctuation irrelevant
    assert M.cider_d(["A Plate of food."], [REFS[2]])[0] == M.cider_d(["a plate of food"], [REFS[2]])[0]
    with pytest.raises(ValueError):
        M.bleu4(["a"], [])
    with pytest.raises(ValueError):
        M.cider_d(["a"], [[]])


def test_metric_registry_names():
    assert {"vqav2", "textvqa", "anls", "relaxed_accuracy", "exact_match"} <= set(M.ITEM_METRICS)
    assert set(M.CORPUS_METRICS) == {"cider", "bleu4"} and "multiple_choice" in M.METRIC_NAMES
