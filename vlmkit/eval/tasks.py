"""Benchmark tasks (prompts, targets, scoring) and readers for benchmark files in their public formats.

    from vlmkit.eval.tasks import get_task, read_rows
    task = get_task("vqav2")                    # or a Task, or a YAML/JSON task spec file
    rows = read_rows("vqav2_val.parquet")       # parquet / JSON lines / JSON / TSV / a `datasets` save_to_disk folder

Built-in tasks, with the fields of the public Hugging Face versions (lmms-lab/VQAv2, lmms-lab/textvqa,
lmms-lab/DocVQA, lmms-lab/ChartQA, MMMU/MMMU, lmms-lab/MMBench) and lmms-eval's default prompts:

    vqav2     question, answers ([{"answer": ...}] x10 or strings), image     -> VQAv2 accuracy
    textvqa   question, answers (x10), image                                   -> TextVQA accuracy (EvalAI)
    docvqa    question, answers, image                                         -> ANLS
    chartqa   question, answer, type (human_test / augmented_test), image      -> relaxed accuracy
    mmmu      id, question, options, answer, question_type, image_1..image_7   -> MMMU accuracy
    mmbench   index, question, hint, A..E, answer, category, image             -> circular accuracy
    synthetic the embedded default model's benchmark (vlmkit.data.synthetic)   -> exact match per category

A task spec (YAML or JSON) defines a task over any file:

    name: my_vqa
    data: questions.jsonl            # optional: --data overrides it; relative to the spec file
    prompt: "{question}\\nAnswer the question using a single word or phrase."
    image_field: image               # a field, a list of fields, or null (text only)
    answer_field: answers
    metric: vqav2                    # vqav2 textvqa anls relaxed_accuracy exact_match multiple_choice cider bleu4
    options_field: options           # multiple_choice only: a list of option texts; "{choices}" in the prompt
    id_field: question_id            # optional (default: the row number)
    category_field: type             # optional: scores per value of this field too
    max_new_tokens: 16
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from . import metrics as M

__all__ = [
    "Task", "Rows", "TASKS", "get_task", "task_names", "read_rows", "load_task_spec", "resolve_image",
    "VQA_SUFFIX", "CHOICE_SUFFIX", "MMMU_DOMAINS",
]

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
MMBENCH_OPTIONS_HEADER = "There are several options:"

DATA_EXTENSIONS = (".parquet", ".arrow", ".jsonl", ".ndjson", ".json", ".tsv")
SPLIT_PREFERENCE = ("validation", "val", "dev", "test", "testmini", "train")


# ============================================================================================ data readers

class Rows:
    """Rows of a benchmark file (dicts), read lazily; `len()` is known up front, `root` is the folder that
    relative image paths are resolved against."""

    def __init__(self, length: int, factory: Callable[[], Iterator[dict]], root: Path, source: str):
        self._length, self._factory, self.root, self.source = length, factory, root, source

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[dict]:
        return self._factory()


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("reading parquet / arrow benchmark files needs pyarrow: pip install 'vlmkit[eval]'") from None
    import pyarrow as pa

    return pa


def _parquet_rows(paths: list[Path]) -> tuple[int, Callable]:
    _pyarrow()
    import pyarrow.parquet as pq

    total = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)

    def rows():
        for p in paths:
            for batch in pq.ParquetFile(p).iter_batches(batch_size=64):
                yield from batch.to_pylist()

    return total, rows


def _open_arrow(path: Path):
    pa = _pyarrow()
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_stream(source)  # what `datasets` writes
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path), "r")
        return pa.ipc.open_file(source)


def _arrow_batches(reader):
    if hasattr(reader, "num_record_batches"):  # file format
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


def _arrow_rows(paths: list[Path]) -> tuple[int, Callable]:
    total = 0
    for p in paths:
        total += sum(b.num_rows for b in _arrow_batches(_open_arrow(p)))

    def rows():
        for p in paths:
            for batch in _arrow_batches(_open_arrow(p)):
                for start in range(0, batch.num_rows, 64):
                    yield from batch.slice(start, 64).to_pylist()

    return total, rows


def _jsonl_rows(path: Path) -> tuple[int, Callable]:
    with open(path, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())

    def rows():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None

    return total, rows


def _json_rows(path: Path) -> tuple[int, Callable]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        for key in ("data", "rows", "questions", "annotations", "examples", "items"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            columns = [v for v in data.values() if isinstance(v, list)]
            if columns and len(columns) == len(data) and len({len(c) for c in columns}) == 1:  # columnar
                keys = list(data)
                data = [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return len(data), lambda: iter(data)


def _tsv_rows(path: Path) -> tuple[int, Callable]:
    """Tab-separated rows with a header (MMBench's own release: base64 images in an "image" column)."""
    import csv

    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as f:
        total = sum(1 for _ in csv.DictReader(f, delimiter="\t"))

    def rows():
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if row.get("index", "").lstrip("-").isdigit():
                    row["index"] = int(row["index"])
                yield row

    return total, rows


def _file_rows(path: Path) -> tuple[int, Callable]:
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return _tsv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows([path])
    if suffix == ".arrow":
        return _arrow_rows([path])
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    raise ValueError(f"{path}: unknown benchmark file type (expected one of {', '.join(DATA_EXTENSIONS)})")


def _pick_split(splits: Sequence[str], split: Optional[str], where: str) -> str:
    if split is not None:
        if split not in splits:
            raise ValueError(f"{where} has no split {split!r}; it has {', '.join(sorted(splits))}")
        return split
    for name in SPLIT_PREFERENCE:
        if name in splits:
            return name
    return sorted(splits)[0]


def _file_split(path: Path, folder: Path) -> str:
    """The split a data file belongs to: "validation-00000-of-00002.parquet" -> validation, "dev/0000.parquet" ->
    dev (its folder), "test.jsonl" -> test."""
    stem = path.name.split(".")[0]
    m = re.match(r"^(.+?)-\d+-of-\d+", stem)
    if m:
        return m.group(1)
    if stem.isdigit() and path.parent != folder:
        return path.parent.name
    return stem


def read_rows(path, split: Optional[str] = None) -> Rows:
    """Rows of a benchmark: a .parquet / .arrow / .jsonl / .json file, a `datasets` save_to_disk folder (a Dataset,
    or a DatasetDict whose `split` is taken, validation by default), or a folder of data files (the Hugging Face
    Hub layout, e.g. data/validation-00000-of-00001.parquet; `split` picks the files)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"benchmark data {str(path)!r} does not exist")
    if path.is_file():
        total, rows = _file_rows(path)
        return Rows(total, rows, path.parent, str(path))
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        with open(path / "dataset_dict.json", encoding="utf-8") as f:
            splits = json.load(f).get("splits") or [p.name for p in path.iterdir() if (p / "state.json").is_file()]
        return read_rows(path / _pick_split(splits, split, str(path)))
    if (path / "state.json").is_file():  # Dataset.save_to_disk
        with open(path / "state.json", encoding="utf-8") as f:
            state = json.load(f)
        files = [path / d["filename"] for d in state.get("_data_files", [])] or sorted(path.glob("*.arrow"))
        total, rows = _arrow_rows(files)
        return Rows(total, rows, path, str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS
                   and not p.name.startswith(".") and len(p.relative_to(path).parts) <= 4
                   and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if not files:
        raise ValueError(f"{path} holds no benchmark files ({', '.join(DATA_EXTENSIONS)})")
    by_split: dict[str, list[Path]] = {}
    for p in files:
        by_split.setdefault(_file_split(p, path), []).append(p)
    chosen = by_split[_pick_split(list(by_split), split, str(path))] if len(by_split) > 1 or split else files
    kinds = {p.suffix.lower() for p in chosen}
    if kinds == {".parquet"}:
        total, rows = _parquet_rows(chosen)
    elif kinds == {".arrow"}:
        total, rows = _arrow_rows(chosen)
    elif len(chosen) == 1:
        total, rows = _file_rows(chosen[0])
    else:
        parts = [_file_rows(p) for p in chosen]
        total = sum(n for n, _ in parts)

        def rows():
            for _, make in parts:
                yield from make()
    return Rows(total, rows, path, str(path))


# ============================================================================================ images

_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def resolve_image(value, root: Optional[Path] = None, image_root: Optional[Path] = None):
    """A benchmark's image cell -> something `load_image` takes: a Hugging Face Image struct
    {"bytes": ..., "path": ...}, raw bytes, a PIL image, a data: URI / URL, or a path (absolute, or relative to
    `image_root`, to the data file's folder, or to an images/ folder beside it), or bare base64 (MMBench's TSV)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return resolve_image(value["path"], root, image_root)
        raise ValueError("image struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        if value.startswith(("data:", "http://", "https://")):
            return value
        p = Path(value[:4096]).expanduser()
        candidates = [p] if p.is_absolute() else [
            base / p for base in (image_root, root, root / "images" if root else None) if base is not None]
        for c in candidates:
            try:
                if c.is_file():
                    return str(c)
            except OSError:  # a name too long to be a path
                pass
        if len(value) >= 64 and _BASE64.fullmatch(value[:1024]):
            try:
                return base64.b64decode(value, validate=False)  # MMBench TSV cells: bare base64
            except (ValueError, binascii.Error):
                pass
        where = ", ".join(str(c.parent) for c in candidates)
        raise FileNotFoundError(f"image {value[:120]!r} not found (looked in {where})")
    if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
        return value
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


def _present(value) -> bool:
    return value is not None and not M.is_missing(value)


def _field_images(doc: dict, fields: Sequence[str]) -> list:
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


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _breakdown(records: list[dict], scores: dict, fields: Sequence[str], metric: str) -> dict:
    out = {}
    for name in fields:
        groups: dict[str, list[float]] = {}
        for r in records:
            value = r.get(name)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                groups.setdefault(str(value), []).append(scores[r["id"]])
        if groups:
            out[name] = {k: {"n": len(v), metric: _mean(v)} for k, v in sorted(groups.items())}
    return out


def _item_scorer(metric_name: str, fn: Callable, groups: Sequence[str] = (), target_key: str = "target"):
    """score() for tasks whose score is the mean of fn(prediction, target)."""
    def score(records: list[dict], seed: int = 0) -> dict:
        item = {r["id"]: float(fn(r["prediction"], r[target_key])) for r in records}
        return {"metrics": {metric_name: _mean(list(item.values()))},
                "breakdown": _breakdown(records, item, groups, metric_name), "item_scores": item}
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
    return _field_images(row, ("image", "images", "img", "image_path", "image_file"))


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
        _item_scorer("accuracy", M.vqav2_accuracy, ("answer_type",)),
        "VQAv2: VQA accuracy over the 10 annotators' answers (official normalisation)", "question_id", 16)


def _textvqa() -> Task:
    return Task("textvqa", _vqa_build(capitalize=True), lambda r: {"target": _answers(r)},
                _item_scorer("accuracy", M.textvqa_accuracy),
                "TextVQA: VQA accuracy with the EvalAI answer processor", "question_id", 32)


def _docvqa() -> Task:
    return Task("docvqa", _vqa_build(), lambda r: {"target": _answers(r), "question_types": r.get("question_types")},
                _item_scorer("anls", M.anls), "DocVQA: ANLS (threshold 0.5)", "questionId", 64)


def _chartqa() -> Task:
    base = _item_scorer("relaxed_accuracy", M.relaxed_correctness, ("type",))

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


def _options(value) -> list[str]:
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
        letters = M.choice_letters(len(_options(row.get("options"))))
        listed = "\n".join(f"{c}. {o}" for c, o in zip(letters, _options(row.get("options"))))
        return f"{question}\n{listed}\n\n{CHOICE_SUFFIX}"
    return f"{question}\n\n{VQA_SUFFIX.strip()}"


def _mmmu_build(row: dict):
    prompt = _mmmu_prompt(row)
    # The images the text refers to ("<image 2>" -> image_2), in numeric order, as lmms-eval's doc_to_visual.
    names = sorted({t.strip("<>").replace(" ", "_") for t in re.findall(r"<image \d+>", prompt)})
    images = _field_images(row, names) if names else _field_images(row, [f"image_{i}" for i in range(1, 8)])
    if not images:
        images = _main_image(row)
    return prompt, images


def _mmmu_record(row: dict) -> dict:
    item_id = str(row.get("id", ""))
    subject = _mmmu_subject(item_id) if item_id else None
    return {"target": row.get("answer"), "question_type": row.get("question_type", "multiple-choice"),
            "options": _options(row.get("options")), "subject": subject, "domain": _SUBJECT_DOMAIN.get(subject)}


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
    return {"metrics": {"accuracy": _mean(list(item.values()))},
            "breakdown": _breakdown(records, item, ("domain", "subject"), "accuracy"), "item_scores": item}


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
    metrics = {"circular_accuracy": accuracy, "vanilla_accuracy": _mean([float(row["correct"]) for row in rows])}
    return {"metrics": metrics, "counts": {"questions": len(hits)},
            "breakdown": _breakdown(questions, q_scores, ("category", "l2-category"), "circular_accuracy"),
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
    out = _item_scorer("exact_match", M.exact_match, ("category", "kind"))(records, seed)
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


# ============================================================================================ task specs

class _Fields(dict):
    def __missing__(self, key):
        raise KeyError(key)


def _format(template: str, row: dict, extra: dict) -> str:
    values = _Fields({k: ("" if v is None else v) for k, v in row.items() if isinstance(k, str)})
    values.update(extra)
    try:
        return template.format_map(values)
    except KeyError as e:
        raise ValueError(f"the prompt template uses {{{e.args[0]}}} but the row has no such field "
                         f"(fields: {', '.join(sorted(k for k in row if isinstance(k, str)))})") from None
    except (IndexError, ValueError) as e:
        raise ValueError(f"bad prompt template {template!r}: {e}") from None


def load_task_spec(spec: Union[str, os.PathLike, dict]) -> Task:
    """A Task from a YAML / JSON spec file (or an already-parsed dict); see the module docstring."""
    base, default_name = Path("."), "custom"
    if not isinstance(spec, dict):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task spec {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover
                raise ImportError("YAML task specs need PyYAML: pip install 'vlmkit[eval]' (or write the spec as JSON)"
                                  ) from None
            spec = yaml.safe_load(text)
        else:
            spec = json.loads(text)
        base, default_name = path.parent, path.stem
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: a task spec is a mapping of settings")
    spec = dict(spec)
    known = {"name", "data", "split", "prompt", "image_field", "answer_field", "metric", "options_field", "id_field",
             "category_field", "max_new_tokens", "description"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"unknown task spec keys {sorted(unknown)}; known: {sorted(known)}")
    for key in ("prompt", "answer_field", "metric"):
        if not spec.get(key):
            raise ValueError(f"the task spec needs '{key}'")
    metric = str(spec["metric"])
    if metric not in M.METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(M.METRIC_NAMES)}")
    template, answer_field = str(spec["prompt"]), str(spec["answer_field"])
    images = spec.get("image_field", "image")
    image_fields = [] if images is None else [images] if isinstance(images, str) else list(images)
    options_field = spec.get("options_field")
    if metric == "multiple_choice" and not options_field:
        raise ValueError("the multiple_choice metric needs 'options_field' (a list of option texts per row)")
    category = spec.get("category_field")
    groups = (category,) if category else ()

    def build(row):
        extra = {}
        if options_field:
            opts = _options(row.get(options_field))
            extra["choices"] = "\n".join(f"{c}. {o}" for c, o in zip(M.choice_letters(len(opts)), opts))
        return _format(template, row, extra), _field_images(row, image_fields)

    def record(row):
        if answer_field not in row:
            raise ValueError(f"the row has no answer field {answer_field!r}")
        target = row[answer_field]
        if isinstance(target, (list, tuple)):
            target = [str(t["answer"]) if isinstance(t, dict) else str(t) for t in target]
        elif target is not None:
            target = str(target)
        out = {"target": target}
        if options_field:
            out["options"] = _options(row.get(options_field))
        if category:
            out[category] = row.get(category)
        return out

    if metric in M.CORPUS_METRICS:
        fn = M.CORPUS_METRICS[metric]

        def score(records, seed=0):
            refs = [r["target"] if isinstance(r["target"], list) else [r["target"] or ""] for r in records]
            value = fn([r["prediction"] for r in records], refs) if records else 0.0
            return {"metrics": {metric: value}, "breakdown": {}, "item_scores": {}}
    elif metric == "multiple_choice":
        def choice(prediction, target, options, rid, seed):
            index2ans, letters = M.get_multi_choice_info(options)
            picked = M.parse_multi_choice_response(prediction, letters, index2ans, random.Random(f"{seed}:{rid}"))
            gold = target
            if isinstance(target, str) and target not in letters and target in options:  # gold given as text
                gold = letters[options.index(target)]
            return float(M.eval_multi_choice(gold, picked))

        def score(records, seed=0):
            item = {r["id"]: choice(r["prediction"], r["target"], r["options"], r["id"], seed) for r in records}
            return {"metrics": {"accuracy": _mean(list(item.values()))},
                    "breakdown": _breakdown(records, item, groups, "accuracy"), "item_scores": item}
    else:
        score = _item_scorer(metric, M.ITEM_METRICS[metric], groups)

    data = spec.get("data")
    if data and not Path(str(data)).expanduser().is_absolute():
        data = str(base / str(data))
    return Task(str(spec.get("name") or default_name), build, record, score,
                str(spec.get("description", f"user task ({metric})")), spec.get("id_field"),
                int(spec.get("max_new_tokens", 32)), data=data, spec=spec)


def get_task(task: Union[str, os.PathLike, Task, dict]) -> Task:
    """A built-in task by name, a Task as is, or a task spec (a .yaml / .yml / .json path, or a dict)."""
    if isinstance(task, Task):
        return task
    if isinstance(task, dict):
        return load_task_spec(task)
    name = str(task)
    if name in TASKS:
        return TASKS[name]()
    if name.lower().endswith((".yaml", ".yml", ".json")) or os.path.sep in name:
        return load_task_spec(name)
    raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}; or give a .yaml/.json task spec")
