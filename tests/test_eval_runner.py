"""The benchmark runner (`vlmkit.eval.evaluate`, `vlmkit eval`): readers for every format, the built-in tasks on the
fixtures in tests/data/eval (see make_fixtures.py there), resuming, task specs, the synthetic benchmark, the CLI.

Scores are checked with `Oracle`, a stand-in model that answers by rules on the prompt text (so every number is
known); the tiny random checkpoints check the same paths with real generation and image decoding."""

import json
import os
import shutil

import pytest

import vlmkit
from vlmkit import cli
from vlmkit.eval import evaluate, load_predictions, read_rows
from vlmkit.eval import metrics as M
from vlmkit.eval.spec import get_task, load_task_spec
from vlmkit.processing.images import load_image

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eval")


def data(name):
    return os.path.join(DATA, name)


def prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(p.get("text", "") for m in prompt for p in m["content"] if p["type"] == "text")


class Oracle:
    """A model stand-in: `rule(prompt text) -> answer`; decodes every image it gets, counts what it answered."""

    def __init__(self, rule, name="oracle"):
        self.rule, self.name, self.answered, self.calls = rule, name, 0, 0

    def generate_batch(self, prompts, images=None, **options):
        assert options["do_sample"] is False and options["max_new_tokens"] > 0
        self.calls += 1
        for imgs in images or []:
            for im in imgs:
                load_image(im)
        self.answered += len(prompts)
        return [" " + self.rule(prompt_text(p)) + "\n" for p in prompts]


def keyed(table):
    def rule(text):
        for key, answer in table.items():
            if key in text:
                return answer
        return "?"
    return rule


VQAV2 = keyed({"color": "Red.", "How many": "one", "blue?": "No"})
TEXTVQA = keyed({"sign": "STOP", "brand": "Coca-Cola", "number": "10"})
CHARTQA = keyed({"value of A": "43.5", "share": "30%", "zero": "0.0", "highest": "blue"})
DOCVQA = keyed({"greeting": "hello wrld", "code": "abef", "kind": "receipt"})
MMMU = keyed({"fills": "B", "How many": "(C)", "2 + 2": "The answer is 4."})
MMBENCH = keyed({"What color": "red", "How many": "A"})


# ------------------------------------------------------------------------------------------------- readers

def test_readers_for_every_format(tmp_path):
    assert [r["question_id"] for r in read_rows(data("vqav2.jsonl"))] == [100, 101, 102]
    parquet = list(read_rows(data("textvqa.parquet")))
    assert parquet[0]["image"]["bytes"].startswith(b"\x89PNG") and len(parquet[0]["answers"]) == 10
    arrow = read_rows(data("chartqa_arrow"))  # a DatasetDict saved with save_to_disk: its only split
    assert len(arrow) == 4 and [r["answer"] for r in arrow] == ["42", "0.3", "0", "Blue"]
    assert len(read_rows(data("chartqa_arrow/test"))) == 4  # the Dataset folder itself
    with pytest.raises(ValueError, match="no split 'validation'"):
        read_rows(data("chartqa_arrow"), split="validation")
    assert [r["questionId"] for r in read_rows(data("docvqa.json"))] == [300, 301, 302]
    # A Hub-style folder of parquet shards: the split is picked from the file names.
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    shutil.copy(data("textvqa.parquet"), hub / "validation-00000-of-00002.parquet")
    shutil.copy(data("textvqa.parquet"), hub / "validation-00001-of-00002.parquet")
    (hub / "test-00000-of-00001.jsonl").write_text('{"question": "q"}\n')
    assert len(read_rows(tmp_path / "hub")) == 6 and len(read_rows(tmp_path / "hub", split="test")) == 1
    # JSON: a list, {"data": [...]}, or columns
    (tmp_path / "cols.json").write_text(json.dumps({"question": ["a", "b"], "answer": ["1", "2"]}))
    assert list(read_rows(tmp_path / "cols.json")) == [{"question": "a", "answer": "1"},
                                                       {"question": "b", "answer": "2"}]
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.parquet")
    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown benchmark file type"):
        read_rows(tmp_path / "bad.txt")


# ------------------------------------------------------------------------------------------ built-in tasks

@pytest.mark.parametrize("task, file, rule, expected", [
    ("vqav2", "vqav2.jsonl", VQAV2, {"accuracy": (1 + 1 + 0.3) / 3}),
    ("textvqa", "textvqa.parquet", TEXTVQA, {"accuracy": (1 + 1 + 0.9) / 3}),
    ("chartqa", "chartqa_arrow", CHARTQA, {"relaxed_accuracy": 0.75, "relaxed_human_split": 0.5,
                                           "relaxed_augmented_split": 1.0}),
    ("docvqa", "docvqa.json", DOCVQA, {"anls": (10 / 11 + 0.5 + M.anls("receipt", ["invoice"])) / 3}),
    ("mmmu", "mmmu.jsonl", MMMU, {"accuracy": 2 / 3}),
    ("mmbench", "mmbench.jsonl", MMBENCH, {"circular_accuracy": 0.5, "vanilla_accuracy": 5 / 6}),
])
def test_builtin_task_scores(tmp_path, task, file, rule, expected):
    model = Oracle(rule)
    results = evaluate(model, task, data(file), output_dir=tmp_path, batch_size=2)
    assert results["metrics"] == pytest.approx(expected)
    assert results["n"] == model.answered and results["failed"] == 0
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == pytest.approx(expected)
    table = (tmp_path / "results.md").read_text()
    assert table == results["markdown"] and f"| {task} | {next(iter(expected))} |" in table
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == results["n"] and all(x["task"] == task and x["model"] == "oracle" for x in lines)
    assert all(x["prediction"] == x["prediction"].strip() for x in lines)  # generations are stripped


def test_mmbench_tsv_with_base64_images(tmp_path):
    # MMBench's own release: a TSV whose image column holds bare base64
    import base64
    import csv

    rows = [json.loads(x) for x in open(data("mmbench.jsonl"))]
    with open(tmp_path / "mmbench.tsv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        for r in rows:
            raw = open(data(r["image"]), "rb").read()
            writer.writerow(dict(r, image=base64.b64encode(raw).decode()))
    results = evaluate(Oracle(MMBENCH), "mmbench", tmp_path / "mmbench.tsv", output_dir=tmp_path / "out")
    assert results["failed"] == 0
    assert results["metrics"] == pytest.approx({"circular_accuracy": 0.5, "vanilla_accuracy": 5 / 6})


def test_builtin_prompts_follow_lmms_eval():
    row = {"question": "what is it?", "image": "x.png"}
    assert get_task("vqav2").build(row)[0] == "what is it?\nAnswer the question using a single word or phrase."
    assert get_task("textvqa").build(row)[0].startswith("What is it?\n")  # capitalised, as lmms-eval does
    mmmu = {"question": "Pick <image 1> or <image 2>", "options": "['x', 'y']", "question_type": "multiple-choice",
            "image_1": "a.png", "image_2": "b.png", "image_3": None}
    text, images = get_task("mmmu").build(mmmu)
    assert text == ("Pick <image 1> or <image 2>\nA. x\nB. y\n\n"
                    "Answer with the option's letter from the given choices directly.") and images == ["a.png", "b.png"]
    mmb = {"question": "Q?", "hint": "H.", "A": "x", "B": "y", "C": "nan", "D": None, "image": "i.png"}
    assert get_task("mmbench").build(mmb)[0] == ("H. Q? There are several options:\nA. x\nB. y\n\n"
                                                 "Answer with the option's letter from the given choices directly.")


def test_breakdowns(tmp_path):
    vqa = evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path / "a", progress=True)
    assert vqa["breakdown"]["answer_type"] == {"number": {"n": 1, "accuracy": 1.0}, "other": {"n": 1, "accuracy": 1.0},
                                               "yes/no": {"n": 1, "accuracy": pytest.approx(0.3)}}
    mmmu = evaluate(Oracle(MMMU), "mmmu", data("mmmu.jsonl"), output_dir=tmp_path / "b")
    assert mmmu["breakdown"]["subject"] == {"Art": {"n": 1, "accuracy": 0.0}, "Math": {"n": 2, "accuracy": 1.0}}
    assert mmmu["breakdown"]["domain"]["Science"] == {"n": 2, "accuracy": 1.0}
    mmb = evaluate(Oracle(MMBENCH), "mmbench", data("mmbench.jsonl"), output_dir=tmp_path / "c")
    assert mmb["breakdown"]["category"] == {"color_recognition": {"n": 1, "circular_accuracy": 1.0},
                                            "counting": {"n": 1, "circular_accuracy": 0.0}}
    assert "**mmbench by l2-category**" in mmb["markdown"] and mmb["counts"]["questions"] == 2
    assert mmb["markdown"].startswith("## mmbench: oracle (6 items, 2 questions)\n")


# -------------------------------------------------------------------------------------- real tiny models

@pytest.fixture(scope="module")
def tiny_llava(hf_checkpoint_dir):
    return vlmkit.load(hf_checkpoint_dir("llava"))


@pytest.mark.parametrize("task, file", [("vqav2", "vqav2.jsonl"), ("textvqa", "textvqa.parquet"),
                                        ("chartqa", "chartqa_arrow"), ("mmbench", "mmbench.jsonl")])
def test_tiny_model_end_to_end(tiny_llava, tmp_path, task, file):
    results = evaluate(tiny_llava, task, data(file), output_dir=tmp_path, batch_size=2, max_new_tokens=3)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert results["failed"] == 0 and len(lines) == results["n"] == len(read_rows(data(file)))
    assert all(0.0 <= v <= 1.0 for v in results["metrics"].values())
    assert results["model"] == os.path.realpath(tiny_llava.folder) and results["settings"]["max_new_tokens"] == 3


def test_other_family_with_embedded_images(hf_checkpoint_dir, tmp_path):
    m = vlmkit.load(hf_checkpoint_dir("idefics2"))
    results = evaluate(m, "textvqa", data("textvqa.parquet"), output_dir=tmp_path, batch_size=3, max_new_tokens=2)
    assert results["failed"] == 0 and results["n"] == 3


# ---------------------------------------------------------------------------------------------- resuming

class Interrupted(Exception):
    pass


class StopsAfter(Oracle):
    """Answers `calls` batches, then is interrupted (as Ctrl-C or a killed job would)."""

    def __init__(self, rule, calls):
        super().__init__(rule)
        self.left = calls

    def generate_batch(self, prompts, images=None, **options):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return super().generate_batch(prompts, images, **options)


def test_resume_after_an_interruption(tmp_path):
    fresh = evaluate(Oracle(MMBENCH), "mmbench", data("mmbench.jsonl"), output_dir=tmp_path / "fresh", batch_size=2)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(StopsAfter(MMBENCH, calls=1), "mmbench", data("mmbench.jsonl"), output_dir=out, batch_size=2)
    assert len(load_predictions(out / "predictions.jsonl")) == 2  # the first batch was kept
    second = Oracle(MMBENCH)
    resumed = evaluate(second, "mmbench", data("mmbench.jsonl"), output_dir=out, batch_size=2)
    assert second.answered == 4  # only what was missing
    ids = [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6  # no duplicates
    assert resumed["metrics"] == fresh["metrics"] and resumed["breakdown"] == fresh["breakdown"]

    # Everything predicted: a rerun only rescores; a model factory is never called.
    def factory():
        raise AssertionError("the model should not be loaded")

    again = evaluate(factory, "mmbench", data("mmbench.jsonl"), output_dir=out, model_name="oracle")
    assert again["metrics"] == fresh["metrics"]


def test_resume_cuts_a_torn_last_line_and_grows_with_the_limit(tmp_path):
    first = Oracle(VQAV2)
    evaluate(first, "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, limit=2)
    assert first.answered == 2
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write('{"id": "102", "task": "vqav2", "mod')  # a write cut short
    second = Oracle(VQAV2)
    results = evaluate(second, "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, limit=3)
    assert second.answered == 1 and results["n"] == 3
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["100", "101", "102"]


def test_a_folder_of_another_task_or_model_is_refused(tmp_path):
    evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path)
    with pytest.raises(ValueError, match="holds predictions of task 'vqav2'"):
        evaluate(Oracle(DOCVQA), "docvqa", data("docvqa.json"), output_dir=tmp_path)
    with pytest.raises(ValueError, match="by model 'oracle'"):
        evaluate(Oracle(VQAV2, name="other"), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path)
    model = Oracle(VQAV2, name="other")
    evaluate(model, "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, overwrite=True)
    assert model.answered == 3


def test_resume_with_other_settings_is_refused(tmp_path):
    first = Oracle(VQAV2)
    evaluate(first, "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, limit=2, max_new_tokens=4)
    before = (tmp_path / "predictions.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"max_new_tokens 4 \(now 8\).*--overwrite.*another --output"):
        evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, limit=3, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"dtype as stored \(now bfloat16\)"):
        evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, max_new_tokens=4,
                 load_options={"dtype": "bf16"})
    with pytest.raises(ValueError, match=r"quantize none \(now int8\)"):
        evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, max_new_tokens=4,
                 load_options={"quantize": "int8"})
    assert (tmp_path / "predictions.jsonl").read_bytes() == before  # a refusal leaves the file alone
    same = Oracle(VQAV2)  # the same settings resume as before
    results = evaluate(same, "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, max_new_tokens=4)
    assert same.answered == 1 and results["n"] == 3 and results["settings"]["max_new_tokens"] == 4
    again = Oracle(VQAV2)
    results = evaluate(again, "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, max_new_tokens=8, overwrite=True)
    assert again.answered == 3 and results["settings"]["max_new_tokens"] == 8
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [x["settings"]["max_new_tokens"] for x in lines] == [8, 8, 8]


def test_resume_after_the_model_or_prompt_template_changed_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    out = tmp_path / "out"
    evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=out, limit=1, model_name=str(folder))
    (folder / "config.json").write_text('{"a": 2}')  # e.g. re-trained and saved into the same folder
    with pytest.raises(ValueError, match="model_files"):
        evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=out, model_name=str(folder))
    spec = {"name": "quiz", "prompt": "Q: {question}", "answer_field": "answers", "metric": "vqav2"}
    evaluate(Oracle(VQAV2), spec, data("vqav2.jsonl"), output_dir=tmp_path / "spec", limit=1)
    with pytest.raises(ValueError, match="task_prompt"):
        evaluate(Oracle(VQAV2), dict(spec, prompt="Question: {question}"), data("vqav2.jsonl"),
                 output_dir=tmp_path / "spec")
    # the data changed under the same ids: the stored answer was to another question
    rows = [json.loads(x) for x in open(data("vqav2.jsonl"))]
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(dict(r, question=r["question"] + " Really?")) + "\n" for r in rows))
    shutil.copytree(data("images"), tmp_path / "images")
    evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path / "data", limit=1)
    with pytest.raises(ValueError, match="item 100 was predicted for the prompt .* the task now asks"):
        evaluate(Oracle(VQAV2), "vqav2", changed, output_dir=tmp_path / "data")


def test_unreadable_lines_are_removed_and_old_files_refused(tmp_path):
    evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, limit=2)
    path = tmp_path / "predictions.jsonl"
    good = path.read_text().splitlines()
    path.write_text(good[0] + "\n\x00garbage{\n[1, 2]\n\n" + good[1] + "\n" + good[1] + "\n" + '{"id": "102", "ta')
    messages = []
    second = Oracle(VQAV2)
    results = evaluate(second, "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, log=messages.append)
    assert second.answered == 1 and results["n"] == 3
    assert any("removed 3 unreadable line(s)" in m for m in messages)
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["100", "101", "102"]  # every line parses, none repeated
    # predictions written without their settings cannot be checked: refused
    path.write_text("".join(json.dumps({k: v for k, v in json.loads(x).items() if k != "settings"}) + "\n"
                            for x in lines))
    with pytest.raises(ValueError, match="without the settings they were made with"):
        evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path)


def test_failed_items_are_reported_and_retried(tmp_path):
    rows = [json.loads(x) for x in open(data("vqav2.jsonl"))]
    rows[1]["image"] = "images/missing.png"
    src = tmp_path / "vqa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(data("images"), tmp_path / "images")
    messages = []
    results = evaluate(Oracle(VQAV2), "vqav2", src, output_dir=tmp_path / "out", log=messages.append)
    assert results["failed"] == 1 and "missing.png" in results["errors"][0] and "item 101" in messages[0]
    assert results["metrics"]["accuracy"] == pytest.approx((1 + 0 + 0.3) / 3)  # the failure scores 0
    assert len(load_predictions(tmp_path / "out" / "predictions.jsonl")) == 2  # ... and is not saved
    # a model error on one item of a batch costs only that item
    flaky = Oracle(lambda text: (_ for _ in ()).throw(ValueError("prompt too long")) if "blue?" in text else "red")
    results = evaluate(flaky, "vqav2", data("vqav2.jsonl"), output_dir=tmp_path / "flaky", log=messages.append)
    assert results["failed"] == 1 and "prompt too long" in results["errors"][0]
    with pytest.raises(ValueError, match="every item failed"):
        evaluate(Oracle(lambda t: 1 / 0), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path / "bad",
                 log=messages.append)


# ------------------------------------------------------------------------------------------------- specs

def test_yaml_task_spec(tmp_path):
    task = load_task_spec(data("custom.yaml"))
    assert task.name == "color_quiz" and task.data == os.path.join(DATA, "custom.jsonl")
    model = Oracle(keyed({"Which color": "A", "How many": "(A)"}))
    results = evaluate(model, data("custom.yaml"), output_dir=tmp_path)  # data from the spec
    # c1 (A) right, c2 (B) wrong, c3: the gold answer is given as option text "one" -> A, right
    assert results["metrics"] == {"accuracy": pytest.approx(2 / 3)}
    assert results["breakdown"]["kind"] == {"color": {"n": 2, "accuracy": 0.5}, "count": {"n": 1, "accuracy": 1.0}}
    first = json.loads((tmp_path / "predictions.jsonl").read_text().splitlines()[0])
    assert first["id"] == "c1" and first["prompt"].startswith("Which color?\nA. red\nB. green\n")


def test_dict_spec_with_corpus_metric_and_template_errors(tmp_path):
    spec = {"name": "caps", "prompt": "Describe: {question}", "answer_field": "answers", "metric": "cider",
            "image_field": "image"}
    results = evaluate(Oracle(lambda t: "stop"), spec, data("textvqa.parquet"), output_dir=tmp_path / "a")
    preds, refs = ["stop"] * 3, [r["answers"] for r in read_rows(data("textvqa.parquet"))]
    assert results["metrics"]["cider"] == pytest.approx(M.cider_d(preds, refs)[0])
    # the same spec as a JSON file, its data path relative to the file
    shutil.copy(data("textvqa.parquet"), tmp_path / "caps.parquet")
    (tmp_path / "caps.json").write_text(json.dumps(dict(spec, data="caps.parquet")))
    again = evaluate(Oracle(lambda t: "stop"), str(tmp_path / "caps.json"), output_dir=tmp_path / "j")
    assert again["metrics"] == results["metrics"] and again["task"] == "caps"
    with pytest.raises(ValueError, match="no such field"):
        evaluate(Oracle(lambda t: "x"), dict(spec, prompt="{nope}"), data("textvqa.parquet"),
                 output_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="unknown metric"):
        load_task_spec(dict(spec, metric="rouge"))
    with pytest.raises(ValueError, match="unknown task spec keys"):
        load_task_spec(dict(spec, promt="x"))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


# --------------------------------------------------------------------------------------------- synthetic

def test_synthetic_benchmark_per_category(tmp_path):
    from vlmkit.data.synthetic import benchmark_set

    expected = benchmark_set(18)
    answers = iter(s.answer if s.category != "counting" else "many" for s in expected)
    model = Oracle(lambda text: next(answers))
    results = evaluate(model, "synthetic", limit=18, output_dir=tmp_path, batch_size=4)
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    # the same samples as benchmark_set, in order
    assert [x["target"] for x in lines] == [s.answer for s in expected]
    assert [x["prompt"].replace("<image>", "") for x in lines] == [s.question for s in expected]
    assert results["metrics"]["exact_match"] == pytest.approx(16 / 18)
    per_category = results["breakdown"]["category"]
    assert set(per_category) == {s.category for s in expected} and all(v["n"] == 2 for v in per_category.values())
    assert per_category["counting"]["exact_match"] == 0.0 and per_category["color"]["exact_match"] == 1.0
    assert results["metrics"]["caption_cider"] > 0 and 0 < results["metrics"]["caption_bleu4"] <= 1
    assert "| counting | 2 | 0.00 |" in results["markdown"]
    per_kind = results["breakdown"]["kind"]  # and per kind of question, e.g. "yesno: exists"
    assert set(per_kind) == {f"{s.category}: {s.meta['variant']}" for s in expected}
    assert sum(v["n"] for k, v in per_kind.items() if k.startswith("counting: ")) == 2
    assert all(v["exact_match"] == 0.0 for k, v in per_kind.items() if k.startswith("counting: "))


# --------------------------------------------------------------------------------------------------- CLI

def test_cli_eval(hf_checkpoint_dir, tmp_path, capsys):
    model = hf_checkpoint_dir("llava")
    args = ["eval", "--model", model, "--task", "vqav2", "--data", data("vqav2.jsonl"), "--limit", "2",
            "--batch-size", "2", "--output", str(tmp_path), "--max-new-tokens", "2"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "| vqav2 | accuracy |" in out and "**vqav2 by answer_type**" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n"] == 2 and len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 2
    assert cli.main(args[:-8] + ["--limit", "3", "--output", str(tmp_path), "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 3  # resumed: one more item
    # another answer length: refused (the predictions would mix two settings), in one line that says what to do
    assert cli.main(args[:-1] + ["5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmkit: error:") and "max_new_tokens 2 (now 5)" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert cli.main(args[:-1] + ["5", "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["max_new_tokens"] == 5
    assert cli.main(["eval", "--model", model, "--task", data("custom.yaml"), "--output", str(tmp_path / "spec")]) == 0
    assert "| color_quiz | accuracy |" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--task", "nope", "--data", data("vqav2.jsonl")], "unknown task 'nope'"),
    (["--task", "vqav2"], "needs its benchmark data"),
    (["--task", "vqav2", "--data", data("missing.jsonl")], "does not exist"),
])
def test_cli_eval_errors(hf_checkpoint_dir, tmp_path, capsys, extra, message):
    code = cli.main(["eval", "--model", hf_checkpoint_dir("llava"), "--output", str(tmp_path), *extra])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and lines[0].startswith("vlmkit: error:")


def test_no_dtype_is_recorded_as_the_device_compute_dtype(tmp_path):
    # conftest makes the CPU look bf16-less: no --dtype means float32 here, and a resume asking bf16 is refused
    evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path, limit=1,
             load_options={"dtype": None, "quantize": None, "device": "cpu"})
    line = json.loads((tmp_path / "predictions.jsonl").read_text().splitlines()[0])
    assert line["settings"]["dtype"] == "float32"
    with pytest.raises(ValueError, match=r"dtype float32 \(now bfloat16\)"):
        evaluate(Oracle(VQAV2), "vqav2", data("vqav2.jsonl"), output_dir=tmp_path,
                 load_options={"dtype": "bf16", "device": "cpu"})
