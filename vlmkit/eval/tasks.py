"""Benchmark tasks: how a row becomes a prompt and images, what is kept for scoring, and how records score.

    from vlmkit.eval.tasks import TASKS
    task = TASKS["vqav2"]()                     # vlmkit.eval.spec.get_task also takes a YAML/JSON task spec

Built-in tasks, with the fields of the public Hugging Face versions (lmms-lab/VQAv2, lmms-lab/textvqa,
lmms-lab/DocVQA, lmms-lab/ChartQA, MMMU/MMMU, lmms-lab/MMBench) and lmms-eval's default prompts:

    vqav2     question, answers ([{"answer": ...}] x10 or strings), image     -> VQAv2 accuracy
    textvqa   question, answers (x10), image                                   -> TextVQA accuracy (EvalAI)
    docvqa    question, answers, image                                         -> ANLS
    chartqa   question, answer, type (human_test / augmented_test), image      -> relaxed accuracy
    mmmu      id, question, options, answer, question_type, image_1..image_7   -> MMMU accuracy
    mmbench   index, question, hint, A..E, answer, category, image             -> circular accuracy
    synthetic the embedded default model's benchmark (vlmkit.data.synthetic)   -> exact match per category

The rows come from `vlmkit.data.files.read_rows` (parquet / JSON lines / JSON / TSV / `datasets` folders).
"""

from __future__ import annotations

import ast
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..data.files import Rows
from . import metrics as M

__all__ = ["Task", "TASKS", "task_names", "VQA_SUFFIX", "CHOICE_SUFFIX", "MMMU_DOMAINS"]

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
MMBENCH_OPTIONS_HEADER = "There are several options:"


def _present(value) -> bool:
    return value is not None and not M.is_missing(value)


def field_images(doc: dict, fields: Sequence[str]) -> list:
    out = []
    for name in fields:
        value = doc.get(name)
        if isinstance(value, (list, tuple)):
            out.extend(v for v in value if _present(v))
        elif _present(value):
            out.append(value)
    return out


# ============================================================================================ tasks

@dataclass
class Task:
    """A benchmark: how a row becomes a prompt and images, what of it is kept for scoring, how records score.

    build(row) -> (prompt text, [image cells]); record(row) -> JSON-able fields saved beside the prediction
    (the target and whatever scoring needs); score(records, seed) -> {"metrics": {name: value},
    "breakdown": {field: {value: {"n": k, name: value}}}, "item_scores": {id: score}, "counts": {name: k}}
    (counts optional), where each record also has "id" and "prediction". `docs(data, split) -> Rows` replaces
    reading a data file (the synthetic benchmark)."""

    name: str
    build: Callable[[dict], tuple[str, list]]
    record: Callable[[dict], dict]
    score: Callable[[list[dict], int], dict]
    description: str = ""
    id_field: Optional[str] = None
    max_new_tokens: int = 16
    docs: Optional[Callable[[Any, Optional[str]], Rows]] = None
    data: Optional[str] = None  # a spec's default data path
    spec: dict = field(default_factory=dict)

    def doc_id(self, row: dict, index: int) -> str:
        if self.id_field and row.get(self.id_field) is not None:
            return str(row[self.id_field])
        return str(index)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def breakdown(records: list[dict], scores: dict, fields: Sequence[str], metric: str) -> dict:
    out = {}
    for name in fields:
        groups: dict[str, list[float]] = {}
        for r in records:
            value = r.get(name)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                groups.setdefault(str(value), []).append(scores[r["id"]])
        if groups:
            out[name] = {k: {"n": len(v), metric: mean(v)} for k, v in sorted(groups.items())}
    return out


def item_scorer(metric_name: str, fn: Callable, groups: Sequence[str] = (), target_key: str = "target"):
    """score() for tasks whose score is the mean of fn(prediction, target)."""
    def score(records: list[dict], seed: int = 0) -> dict:
        item = {r["id"]: float(fn(r["prediction"], r[target_key])) for r in records}
        return {"metrics": {metric_name: mean(list(item.values()))},
                "breakdown": breakdown(records, item, groups, metric_name), "item_scores": item}
    return score


def _answers(row: dict) -> list[str]:
    value = row.get("answers", row.get("answer"))
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [str(value)]
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in value]


def _first(row: dict, *names, default=None):
    for n in names:
        if row.get(n) is not None:
            return row[n]
    return default


def _main_image(row: dict) -> list:
    return field_images(row, ("image", "images", "img", "image_path", "image_file"))


# -------------------------------------------------------------------------------------------- VQA family

def _vqa_build(capitalize: bool = False):
    def build(row):
        q = str(_first(row, "question", "query", default=""))
        return (q.capitalize() if capitalize else q) + VQA_SUFFIX, _main_image(row)
    return build


def _vqav2() -> Task:
    return Task(
        "vqav2", _vqa_build(), lambda r: {"target": _answers(r), "answer_type": r.get("answer_type"),
                                           "question_type": r.get("question_type")},
        item_scorer("accuracy", M.vqav2_accuracy, ("answer_type",)),
        "VQAv2: VQA accuracy over the 10 annotators' answers (official normalisation)", "question_id", 16)


def _textvqa() -> Task:
    return Task("textvqa", _vqa_build(capitalize=True), lambda r: {"target": _answers(r)},
                item_scorer("accuracy", M.textvqa_accuracy),
                "TextVQA: VQA accuracy with the EvalAI answer processor", "question_id", 32)


def _docvqa() -> Task:
    return Task("docvqa", _vqa_build(), lambda r: {"target": _answers(r), "question_types": r.get("question_types")},
                item_scorer("anls", M.anls), "DocVQA: ANLS (threshold 0.5)", "questionId", 64)


def _chartqa() -> Task:
    base = item_scorer("relaxed_accuracy", M.relaxed_correctness, ("type",))

    def score(records, seed=0):
        out = base(records, seed)
        for split, key in (("human_test", "relaxed_human_split"), ("augmented_test", "relaxed_augmented_split")):
            group = out["breakdown"].get("type", {}).get(split)
            if group:
                out["metrics"][key] = group["relaxed_accuracy"]
        return out

    def record(r):
        answer = r.get("answer", r.get("label"))
        if isinstance(answer, (list, tuple)):
            answer = [str(a) for a in answer]
        return {"target": answer if isinstance(answer, list) else "" if answer is None else str(answer),
                "type": r.get("type")}

    return Task("chartqa", _vqa_build(), record, score, "ChartQA: relaxed accuracy (5% on numbers)", None, 16)


# -------------------------------------------------------------------------------------------------- MMMU

MMMU_DOMAINS = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
_SUBJECT_DOMAIN = {s: d for d, subjects in MMMU_DOMAINS.items() for s in subjects}


def parse_options(value) -> list[str]:
    """MMMU stores its options as the string of a Python list; accept a real list too."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return []
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"cannot read the options {value[:80]!r}") from None
    return [str(v) for v in value]


def _mmmu_subject(item_id: str) -> Optional[str]:
    """'validation_Art_Theory_12' -> 'Art_Theory' (lmms-eval `extract_subset_name`)."""
    split = item_id.split("_")[0]
    m = re.match(rf"^{re.escape(split)}_(.+?)_\d+$", item_id)
    return m.group(1) if m else None


def _mmmu_prompt(row: dict) -> str:
    question = str(row.get("question", ""))
    if row.get("question_type", "multiple-choice") == "multiple-choice":
        letters = M.choice_letters(len(parse_options(row.get("options"))))
        listed = "\n".join(f"{c}. {o}" for c, o in zip(letters, parse_options(row.get("options"))))
        return f"{question}\n{listed}\n\n{CHOICE_SUFFIX}"
    return f"{question}\n\n{VQA_SUFFIX.strip()}"


def _mmmu_build(row: dict):
    prompt = _mmmu_prompt(row)
    # The images the text refers to ("<image 2>" -> image_2), in numeric order, as lmms-eval's doc_to_visual.
    names = sorted({t.strip("<>").replace(" ", "_") for t in re.findall(r"<image \d+>", prompt)})
    images = field_images(row, names) if names else field_images(row, [f"image_{i}" for i in range(1, 8)])
    if not images:
        images = _main_image(row)
    return prompt, images


def _mmmu_record(row: dict) -> dict:
    item_id = str(row.get("id", ""))
    subject = _mmmu_subject(item_id) if item_id else None
    return {"target": row.get("answer"), "question_type": row.get("question_type", "multiple-choice"),
            "options": parse_options(row.get("options")), "subject": subject, "domain": _SUBJECT_DOMAIN.get(subject)}


def _mmmu_score(records: list[dict], seed: int = 0) -> dict:
    item = {}
    for r in records:
        gold = r["target"]
        if isinstance(gold, str) and gold.startswith("["):
            try:
                gold = ast.literal_eval(gold)  # some answers are stored as the string of a list
            except (ValueError, SyntaxError):
                pass
        if r["question_type"] == "multiple-choice":
            index2ans, letters = M.get_multi_choice_info(r["options"])
            rng = random.Random(f"{seed}:{r['id']}")  # the random fallback: reproducible per item
            parsed = M.parse_multi_choice_response(r["prediction"], letters, index2ans, rng)
            r["parsed"] = parsed
            item[r["id"]] = float(M.eval_multi_choice(gold, parsed))
        else:
            parsed = M.parse_open_response(r["prediction"])
            item[r["id"]] = float(M.eval_open(gold, parsed))
    return {"metrics": {"accuracy": mean(list(item.values()))},
            "breakdown": breakdown(records, item, ("domain", "subject"), "accuracy"), "item_scores": item}


def _mmmu() -> Task:
    return Task("mmmu", _mmmu_build, _mmmu_record, _mmmu_score,
                "MMMU: multiple choice parsed as MMMU does (open questions too), accuracy", "id", 16)


# ----------------------------------------------------------------------------------------------- MMBench

_MMBENCH_LETTERS = ("A", "B", "C", "D", "E")


def _mmbench_choices(row: dict) -> dict:
    return {c: str(row[c]) for c in _MMBENCH_LETTERS if c in row and _present(row[c])}


def _mmbench_build(row: dict):
    choices = _mmbench_choices(row)
    options = MMBENCH_OPTIONS_HEADER + "\n" + "".join(f"{k}. {v}\n" for k, v in choices.items())
    options = options.rstrip("\n")
    hint = row.get("hint")
    query = f"{hint} {row.get('question', '')} {options}" if _present(hint) else f"{row.get('question', '')} {options}"
    return f"{query}\n\n{CHOICE_SUFFIX}", _main_image(row)


def _mmbench_record(row: dict) -> dict:
    return {"target": row.get("answer"), "index": row.get("index"), "choices": _mmbench_choices(row),
            "category": row.get("category"), "l2-category": row.get("l2-category", row.get("L2-category"))}


def _mmbench_score(records: list[dict], seed: int = 0) -> dict:
    rows = []
    for n, r in enumerate(records):
        picked = M.mmbench_extract_choice(r["prediction"], r["choices"])
        r["parsed"] = picked
        index = r.get("index")
        rows.append({"index": int(index) if index is not None else n, "correct": picked == r["target"], "id": r["id"]})
    accuracy, hits = M.circular_accuracy(rows)
    # Per question (its main row: index < 1e6, else the first shift seen), with that row's categories.
    main: dict = {}
    for row, r in zip(rows, records):
        q = row["index"] % M.CIRCULAR_OFFSET
        if q not in main or row["index"] < M.CIRCULAR_OFFSET:
            main[q] = r
    questions = [dict(main[q], id=f"q{q}") for q in hits]
    q_scores = {f"q{q}": float(h) for q, h in hits.items()}
    metrics = {"circular_accuracy": accuracy, "vanilla_accuracy": mean([float(row["correct"]) for row in rows])}
    return {"metrics": metrics, "counts": {"questions": len(hits)},
            "breakdown": breakdown(questions, q_scores, ("category", "l2-category"), "circular_accuracy"),
            "item_scores": {row["id"]: float(row["correct"]) for row in rows}}


def _mmbench() -> Task:
    return Task("mmbench", _mmbench_build, _mmbench_record, _mmbench_score,
                "MMBench: circular evaluation (every shift of the options must be right)", "index", 16)


# --------------------------------------------------------------------------------------------- synthetic

def _synthetic_docs(seed: Optional[int] = None, n: int = 2000):
    """The rows of `vlmkit.data.synthetic.benchmark_set(n, seed)`, generated one at a time (same samples)."""
    def docs(data, split):
        from ..data import synthetic as S

        bench_seed = S.BENCHMARK_SEED if seed is None else seed
        if data is not None and str(data).strip():
            try:
                bench_seed = int(str(data))
            except ValueError:
                raise ValueError(f"the synthetic task takes no data file; --data may only give a benchmark "
                                 f"seed (>= {S.TRAIN_SEED_LIMIT}), got {data!r}") from None
        if bench_seed < S.TRAIN_SEED_LIMIT:
            raise ValueError(f"benchmark seeds must be >= {S.TRAIN_SEED_LIMIT} (training uses seeds below it)")
        categories = tuple(S.BENCHMARK_CATEGORIES)
        gen = S.SyntheticGenerator(bench_seed, categories=categories, stage=2)

        def rows():
            for i in range(n):
                s = gen.qa_sample(i, category=categories[i % len(categories)])
                yield {"index": i, "sample": s, "question": s.question, "answer": s.answer, "category": s.category,
                       "kind": f"{s.category}: {s.meta.get('variant')}"}

        return Rows(n, rows, Path("."), f"vlmkit.data.synthetic.benchmark_set(n={n}, seed={bench_seed})")
    return docs


def _synthetic_build(row: dict):
    s = row["sample"]
    return s.messages(include_answer=False), list(s.images)


def _synthetic_score(records: list[dict], seed: int = 0) -> dict:
    out = item_scorer("exact_match", M.exact_match, ("category", "kind"))(records, seed)
    captions = [r for r in records if r.get("category") == "caption"]
    if captions:
        preds, refs = [r["prediction"] for r in captions], [[r["target"]] for r in captions]
        out["metrics"]["caption_cider"] = M.cider_d(preds, refs)[0]
        out["metrics"]["caption_bleu4"] = M.bleu4(preds, refs)
        out["counts"] = {"caption_items": len(captions)}
    return out


def synthetic_task(seed: Optional[int] = None, n: int = 2000) -> Task:
    """The embedded default model's benchmark: `benchmark_set(n, seed)` scored by exact match (case and
    punctuation ignored) per category and per kind of question within it ("yesno: count", what a miss is made
    of); caption items also get CIDEr-D / BLEU-4 against their one caption."""
    return Task("synthetic", _synthetic_build,
                lambda r: {"target": r["answer"], "category": r["category"], "kind": r["kind"]},
                _synthetic_score, "vlmkit synthetic benchmark: exact match per category", "index", 24,
                docs=_synthetic_docs(seed, n))


TASKS: dict[str, Callable[[], Task]] = {
    "vqav2": _vqav2, "textvqa": _textvqa, "docvqa": _docvqa, "chartqa": _chartqa, "mmmu": _mmmu,
    "mmbench": _mmbench, "synthetic": synthetic_task,
}


def task_names() -> list[str]:
    return list(TASKS)
