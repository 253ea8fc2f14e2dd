"""Regenerates the fine-tuning fixtures in this folder (the committed files are its output).

    python tests/data/train/make_fixtures.py          # needs pillow and pyarrow

Tiny images of coloured shapes and, for each reader format, a few records in its public layout:
    llava.json            LLaVA JSON list: image paths relative to images/, multi-turn, one text-only record,
                          and two bad records (#6: 2 <image> placeholders for 1 image, #7: a missing image file)
    cauldron.parquet      The Cauldron: images embedded as {"bytes", "path"} structs, texts of user/assistant turns
    cauldron_ds/          the same rows as a `datasets` save_to_disk folder (arrow stream + state.json)
    interleaved.jsonl     OBELICS-style documents: parallel texts / images lists (null where the other is set)
    captions.jsonl        caption pairs {"image", "caption"}
    captions_folder/      images with a same-named .txt caption beside each
"""

import io
import json
import os

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 30), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square")


def image(color: str, shape: str) -> Image.Image:
    im = Image.new("RGB", (32, 32), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    (draw.ellipse if shape == "circle" else draw.rectangle)((6, 6, 26, 26), fill=COLORS[color])
    return im


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def items():
    return [(c, s) for c in COLORS for s in SHAPES]


def main():
    os.makedirs(os.path.join(HERE, "images"), exist_ok=True)
    for c, s in items():
        image(c, s).save(os.path.join(HERE, "images", f"{c}_{s}.png"))

    llava = []
    for k, (c, s) in enumerate(items()[:6]):
        conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": c.title()}]
        if k % 2:
            conv += [{"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": f"A {s}."}]
        llava.append({"id": f"l{k}", "image": f"{c}_{s}.png", "conversations": conv})
    llava[5] = {"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                 {"from": "gpt", "value": "Hi!"}]}
    llava.append({"id": "bad-count", "image": "red_circle.png", "conversations": [
        {"from": "human", "value": "<image><image>\nTwo?"}, {"from": "gpt", "value": "No."}]})
    llava.append({"id": "bad-file", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "Red."}]})
    with open(os.path.join(HERE, "llava.json"), "w") as f:
        json.dump(llava, f, indent=1)

    rows = []
    for c, s in items():
        rows.append({"images": [{"bytes": png(image(c, s)), "path": f"{c}_{s}.png"}],
                     "texts": [{"user": "Which color is it?", "assistant": c, "source": "fixture"},
                               {"user": "Which shape?", "assistant": s, "source": "fixture"}]})
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    pq.write_table(table, os.path.join(HERE, "cauldron.parquet"))
    folder = os.path.join(HERE, "cauldron_ds")
    os.makedirs(folder, exist_ok=True)
    with pa.OSFile(os.path.join(folder, "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"}, f)

    with open(os.path.join(HERE, "interleaved.jsonl"), "w") as f:
        for k in range(6):
            (c1, s1), (c2, s2) = items()[k], items()[(k + 3) % 8]
            texts = ["A page about shapes.", None, f"Here is a {c1} {s1}.", None, f"And a {c2} {s2}."]
            images = [None, f"images/{c1}_{s1}.png", None, f"images/{c2}_{s2}.png", None]
            f.write(json.dumps({"texts": texts, "images": images}) + "\n")

    with open(os.path.join(HERE, "captions.jsonl"), "w") as f:
        for c, s in items():
            f.write(json.dumps({"image": f"images/{c}_{s}.png", "caption": f"A {c} {s} on white."}) + "\n")
    folder = os.path.join(HERE, "captions_folder")
    os.makedirs(folder, exist_ok=True)
    for c, s in items()[:4]:
        image(c, s).save(os.path.join(folder, f"{c}_{s}.png"))
        with open(os.path.join(folder, f"{c}_{s}.txt"), "w") as f:
            f.write(f"A {c} {s}.\n")


if __name__ == "__main__":
    main()
