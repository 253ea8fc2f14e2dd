"""Regenerates the eval fixtures in this folder (the committed files are its output).

    python tests/data/eval/make_fixtures.py          # needs pillow and pyarrow; `datasets` for chartqa_arrow/

Each benchmark file holds a few rows in the public format of its Hugging Face version:
    vqav2.jsonl        JSON lines, image paths relative to this folder (images/...), VQAv2 answer dicts
    textvqa.parquet    parquet, images embedded as {"bytes", "path"} structs, 10 answers per question
    chartqa_arrow/     a `datasets` DatasetDict saved with save_to_disk (split "test"), Image feature
    docvqa.json        a JSON list, bare image file names (found in images/ beside the file)
    mmmu.jsonl         MMMU rows: options as a Python-list string, image_1 paths, an open question
    mmbench.jsonl      MMBench rows with circular copies (index + k * 1,000,000), "nan" options and hints
    custom.jsonl + custom.yaml   a user task spec (multiple choice with an options list)
"""

import io
import json
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}


def png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), COLORS[color]).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(name, rows):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    os.makedirs(os.path.join(HERE, "images"), exist_ok=True)
    for c in COLORS:
        with open(os.path.join(HERE, "images", f"{c}.png"), "wb") as f:
            f.write(png(c))

    def answers(values):
        return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(values)]

    write_jsonl("vqav2.jsonl", [
        {"question_id": 100, "question": "What color is the square?", "answers": answers(["red"] * 10),
         "answer_type": "other", "question_type": "what color is the", "image": "images/red.png"},
        {"question_id": 101, "question": "How many squares are there?", "answers": answers(["1"] * 8 + ["2"] * 2),
         "answer_type": "number", "question_type": "how many", "image": "images/blue.png"},
        {"question_id": 102, "question": "Is the square blue?", "answers": answers(["yes"] * 9 + ["no"]),
         "answer_type": "yes/no", "question_type": "is the", "image": "images/blue.png"},
    ])

    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        ("what is written on the sign?", ["stop"] * 10, "red"),
        ("what brand is it?", ["coca cola"] * 5 + ["coca-cola"] * 5, "green"),
        ("what number is shown?", ["10", "10", "ten"] + ["11"] * 7, "blue"),
    ]
    table = pa.table({
        "question_id": pa.array([200, 201, 202], pa.int64()),
        "question": [q for q, _, _ in rows],
        "answers": pa.array([a for _, a, _ in rows], pa.list_(pa.string())),
        "image": pa.array([{"bytes": png(c), "path": f"{c}.png"} for _, _, c in rows], image_type),
    })
    pq.write_table(table, os.path.join(HERE, "textvqa.parquet"))

    try:
        import datasets
    except ImportError:
        print("datasets is not installed: chartqa_arrow/ left as it is")
    else:
        ds = datasets.Dataset.from_dict(
            {"question": ["What is the value of A?", "What share is B?", "How many bars are zero?",
                          "Which color is highest?"],
             "answer": ["42", "0.3", "0", "Blue"],
             "type": ["human_test", "augmented_test", "human_test", "augmented_test"],
             "image": [{"bytes": png(c), "path": None} for c in ("red", "green", "blue", "blue")]},
            features=datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                        "type": datasets.Value("string"), "image": datasets.Image()}))
        datasets.DatasetDict({"test": ds}).save_to_disk(os.path.join(HERE, "chartqa_arrow"))

    with open(os.path.join(HERE, "docvqa.json"), "w", encoding="utf-8") as f:
        json.dump([
            {"questionId": 300, "question": "What is the greeting?", "answers": ["hello world", "Hello World!"],
             "image": "red.png"},
            {"questionId": 301, "question": "What is the code?", "answers": ["abcd"], "image": "green.png"},
            {"questionId": 302, "question": "What kind of document is this?", "answers": ["invoice"],
             "image": "blue.png"},
        ], f, indent=1)

    write_jsonl("mmmu.jsonl", [
        {"id": "validation_Art_1", "question": "Which color fills <image 1>?",
         "options": "['red', 'blue', 'green', 'yellow']", "answer": "A", "question_type": "multiple-choice",
         "image_1": "images/red.png", "image_2": None},
        {"id": "validation_Math_2", "question": "How many squares are in <image 1>?",
         "options": "['1', '2', '3', '4']", "answer": "C", "question_type": "multiple-choice",
         "image_1": "images/blue.png", "image_2": None},
        {"id": "validation_Math_3", "question": "<image 1> What is 2 + 2?", "options": "[]", "answer": "4",
         "question_type": "open", "image_1": "images/green.png", "image_2": None},
    ])

    color = ["red", "blue", "green", "yellow"]
    mmbench = []
    for k in range(4):  # the 4 circular shifts of question 0; its answer (red) moves with the options
        opts = color[k:] + color[:k]
        mmbench.append({"index": k * 1_000_000, "question": "What color is the square?", "hint": "nan",
                        "A": opts[0], "B": opts[1], "C": opts[2], "D": opts[3], "E": "nan",
                        "answer": "ABCD"[opts.index("red")], "category": "color_recognition",
                        "l2-category": "perception", "image": "images/red.png"})
    for k, (a, b) in enumerate([("1", "2"), ("2", "1")]):
        mmbench.append({"index": 1 + k * 1_000_000, "question": "How many squares?", "hint": "Count them.",
                        "A": a, "B": b, "C": "nan", "D": "nan", "E": "nan", "answer": "A" if a == "1" else "B",
                        "category": "counting", "l2-category": "reasoning", "image": "images/blue.png"})
    write_jsonl("mmbench.jsonl", mmbench)

    write_jsonl("custom.jsonl", [
        {"uid": "c1", "prompt_text": "Which color?", "opts": ["red", "green"], "label": "A", "kind": "color",
         "picture": "images/red.png"},
        {"uid": "c2", "prompt_text": "Which color?", "opts": ["red", "green"], "label": "B", "kind": "color",
         "picture": "images/green.png"},
        {"uid": "c3", "prompt_text": "How many?", "opts": ["one", "two", "three"], "label": "one", "kind": "count",
         "picture": "images/blue.png"},
    ])


if __name__ == "__main__":
    main()
