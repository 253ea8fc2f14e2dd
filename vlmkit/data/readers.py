"""Fine-tuning data readers: local files in the public formats -> `Example`s, with every bad record reported.

    from vlmkit.data.readers import read_dataset
    data = read_dataset("llava_instruct.json", image_root="coco/train2017")     # format detected from the records
    data = read_dataset(["cauldron_vqa.parquet", "captions.jsonl"], on_error="raise")
    len(data), data[0], data.reports[0].summary()

Formats (one record -> one or more examples):
    llava        {"image": "a.jpg" | [...], "conversations": [{"from": "human", "value": "<image>\\nQ"},
                  {"from": "gpt", "value": "A"}, ...]}                           -> chat (text-only when no image)
    cauldron     {"images": [img, ...], "texts": [{"user": Q, "assistant": A, "source": ...}, ...]}
                 (The Cauldron; the images go at the start of the first user turn, as Idefics2 was trained) -> chat
    interleaved  {"texts": [str | null, ...], "images": [img | null, ...]} parallel lists, one of the two set per
                 position (OBELICS)                                                 -> interleaved document
    captions     {"image": img, "caption" | "text": str | [str, ...]} (one example per caption), or a folder of
                 images each with a same-named .txt caption beside it                -> caption
Files: .json (a list, {"data": [...]}, columns), .jsonl, .parquet, .arrow, a `datasets` save_to_disk folder, or a
folder of such files (Hub layout; `split` picks). Images: embedded ({"bytes", "path"} structs as `datasets` writes
them, raw bytes, data: URIs) or paths (absolute, or relative to `image_root`, the data file's folder or images/
beside it). http(s) URLs are never fetched: such a record is reported as bad.

A bad record (malformed turns, placeholder/image count mismatch, missing image file, ...) is reported with its
index and reason; on_error="skip" (default) skips it and counts it in `reports`, on_error="raise" stops at it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .files import read_rows, resolve_image

IMAGE = "<image>"
FORMATS = ("llava", "cauldron", "interleaved", "captions")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# LLaVA's "from" values (and the chat names some conversions use) -> chat roles.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
              "bot": "assistant", "model": "assistant"}
CAPTION_FIELDS = ("caption", "captions", "text", "sentences", "sentence")
IMAGE_FIELDS = ("image", "images", "image_path", "file_name", "filename", "img", "url")


class DataError(ValueError):
    """A record that cannot be used; the reader reports it with its index."""


@dataclass
class Example:
    """One training example. `images` are image sources (path strings, bytes, PIL images) in placeholder order.

    kind "chat":        turns = [(role, text)], roles system/user/assistant, `<image>` placeholders in user turns
    kind "caption":     caption = the text that describes images
    kind "interleaved": pieces = strings, and None wherever the next image goes
    """

    kind: str
    images: list = field(default_factory=list)
    turns: list = field(default_factory=list)
    caption: str = ""
    pieces: list = field(default_factory=list)
    index: int = -1  # the record's position in its file, for reports
    source: str = ""


@dataclass
class ReadReport:
    """What reading one file gave: records read, examples made, records skipped (index, reason)."""

    source: str
    format: str
    records: int = 0
    examples: int = 0
    skipped: list = field(default_factory=list)

    def summary(self) -> str:
        line = f"{self.source} ({self.format}): {self.records} records -> {self.examples} examples"
        if self.skipped:
            shown = "; ".join(f"#{i}: {why}" for i, why in self.skipped[:5])
            more = f" (+{len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            line += f", {len(self.skipped)} bad records skipped: {shown}{more}"
        return line


class TrainData:
    """Examples from one or more files, with a report per file; indexable, so a step's batch is a pure function
    of the step (what exact resume needs)."""

    def __init__(self, examples: list[Example], reports: list[ReadReport]):
        self.examples, self.reports = examples, reports

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def skipped(self) -> int:
        return sum(len(r.skipped) for r in self.reports)

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.reports)


# ------------------------------------------------------------------------------------------------ images

def _image_resolver(root: Path, image_root: Optional[Path]) -> Callable[[Any], Any]:
    def resolve(value):
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            raise DataError(f"image {value[:80]!r} is a URL; training reads local or embedded images only "
                            "(download the images and point image_root at them)")
        try:
            return resolve_image(value, root, image_root)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None

    return resolve


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ------------------------------------------------------------------------------------------------ formats

def _check_placeholders(turns: list, n_images: int) -> list:
    """Every placeholder in a user turn; as many as images. With none at all, LLaVA's rule: images go first."""
    placed = sum(text.count(IMAGE) for _, text in turns)
    if any(IMAGE in text for role, text in turns if role != "user"):
        raise DataError(f"an {IMAGE} placeholder outside a user turn")
    if placed == 0 and n_images:
        first = next(i for i, (role, _) in enumerate(turns) if role == "user")
        turns[first] = ("user", IMAGE * n_images + "\n" + turns[first][1])
    elif placed != n_images:
        raise DataError(f"{placed} {IMAGE} placeholders but {n_images} images")
    return turns


def _check_turns(turns: list) -> list:
    """An optional system turn, then user/assistant alternating, ending with a non-empty answer."""
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    if not body:
        raise DataError("no conversation turns")
    for k, (role, text) in enumerate(body):
        want = "user" if k % 2 == 0 else "assistant"
        if role != want:
            raise DataError(f"turn {k} is {role!r}, expected {want!r} (turns must alternate user/assistant)")
        if role == "assistant" and not text.strip():
            raise DataError(f"turn {k}: empty answer")
    if body[-1][0] != "assistant":
        raise DataError("the conversation ends with a user turn (nothing to learn from)")
    return turns


def llava_examples(rec: dict, resolve) -> list[Example]:
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError("no 'conversations' list")
    turns = []
    for k, t in enumerate(conv):
        if not isinstance(t, dict):
            raise DataError(f"turn {k} is not an object")
        role = ROLE_NAMES.get(str(t.get("from", t.get("role", ""))).lower())
        text = t.get("value", t.get("content"))
        if role is None or not isinstance(text, str):
            raise DataError(f"turn {k} needs 'from' (human/gpt) and a string 'value'")
        turns.append((role, text))
    images = [resolve(x) for x in _as_list(rec.get("image", rec.get("images")))]
    turns = _check_placeholders(_check_turns(turns), len(images))
    return [Example("chat", images=images, turns=turns)]


def cauldron_examples(rec: dict, resolve) -> list[Example]:
    texts = rec.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, dict) for t in texts):
        raise DataError("'texts' must be a non-empty list of {user, assistant} objects")
    turns = []
    for k, t in enumerate(texts):
        user, answer = t.get("user"), t.get("assistant")
        if not isinstance(user, str) or not isinstance(answer, str):
            raise DataError(f"texts[{k}] needs string 'user' and 'assistant'")
        turns += [("user", user), ("assistant", answer)]
    images = [resolve(x) for x in _as_list(rec.get("images"))]
    if not any(IMAGE in text for _, text in turns) and images:  # The Cauldron: images lead the first user turn
        turns[0] = ("user", IMAGE * len(images) + turns[0][1])
    turns = _check_placeholders(_check_turns(turns), len(images))
    return [Example("chat", images=images, turns=turns)]


def interleaved_examples(rec: dict, resolve) -> list[Example]:
    texts, images = rec.get("texts"), rec.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise DataError("'texts' and 'images' must be lists of the same length")
    pieces, sources = [], []
    for k, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise DataError(f"position {k} must hold exactly one of a text and an image")
        if image is not None:
            pieces.append(None)
            sources.append(resolve(image))
        elif not isinstance(text, str):
            raise DataError(f"texts[{k}] is not a string")
        else:
            pieces.append(text)
    first_image = pieces.index(None) if None in pieces else len(pieces)
    if not any(isinstance(p, str) and p.strip() for p in pieces[first_image:]):
        raise DataError("no text follows an image (nothing to learn from)")
    return [Example("interleaved", images=sources, pieces=pieces)]


def caption_examples(rec: dict, resolve) -> list[Example]:
    image_key = next((k for k in IMAGE_FIELDS if rec.get(k) is not None), None)
    text_key = next((k for k in CAPTION_FIELDS if rec.get(k) is not None), None)
    if image_key is None or text_key is None:
        raise DataError(f"a caption record needs an image ({'/'.join(IMAGE_FIELDS[:3])}) and a caption "
                        f"({'/'.join(CAPTION_FIELDS[:3])})")
    images = [resolve(x) for x in _as_list(rec[image_key])]
    captions = _as_list(rec[text_key])
    captions = [c.get("raw", c.get("caption")) if isinstance(c, dict) else c for c in captions]  # COCO-style
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise DataError("empty or non-string caption")
    return [Example("caption", images=images, caption=c) for c in captions]


PARSERS = {"llava": llava_examples, "cauldron": cauldron_examples, "interleaved": interleaved_examples,
           "captions": caption_examples}


def detect_format(rec: dict) -> Optional[str]:
    """The format a record is in, from its keys (None: unknown)."""
    if not isinstance(rec, dict):
        return None
    if "conversations" in rec:
        return "llava"
    texts = rec.get("texts")
    if isinstance(texts, list) and texts and isinstance(texts[0], dict):
        return "cauldron"
    if isinstance(texts, list) and isinstance(rec.get("images"), list):
        return "interleaved"
    if any(k in rec for k in CAPTION_FIELDS) and any(k in rec for k in IMAGE_FIELDS):
        return "captions"
    return None


# ------------------------------------------------------------------------------------------------ files

def _caption_folder(folder: Path) -> list[dict]:
    """Images with a same-named .txt beside them (a.png + a.txt) -> caption records."""
    rows = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        text = image.with_suffix(".txt")
        rows.append({"image": image.name, "caption": text.read_text(encoding="utf-8").strip()
                     if text.is_file() else None})
    return rows


def read_file(path, format: str = "auto", split: Optional[str] = None, image_root=None,
              on_error: str = "skip", log=None) -> tuple[list[Example], ReadReport]:
    """One file or folder -> (examples, report). See the module docstring for formats and `on_error`."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    if format != "auto" and format not in PARSERS:
        raise ValueError(f"unknown data format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    path = Path(path).expanduser()
    image_root = Path(image_root).expanduser() if image_root else None
    if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()) and \
            any(p.suffix == ".txt" for p in path.iterdir()):
        rows, root, source = _caption_folder(path), path, str(path)
        format = "captions" if format == "auto" else format
    else:
        table = read_rows(path, split=split)
        rows, root, source = table, table.root, table.source
    resolve = _image_resolver(Path(root), image_root)
    report = ReadReport(source, format)
    examples: list[Example] = []
    for index, rec in enumerate(rows):
        report.records += 1
        fmt = report.format if report.format != "auto" else detect_format(rec)
        try:
            if fmt is None:
                raise DataError(f"unknown record layout (keys: {sorted(rec)[:8] if isinstance(rec, dict) else rec})")
            if not isinstance(rec, dict):
                raise DataError("a record must be an object")
            made = PARSERS[fmt](rec, resolve)
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"{source}: record {index}: {e}") from None
            report.skipped.append((index, str(e)))
            continue
        report.format = fmt  # the first good record fixes the format for the rest of the file
        for ex in made:
            ex.index, ex.source = index, source
        examples += made
    report.examples = len(examples)
    if report.skipped and log is not None:
        log(f"warning: {report.summary()}")
    return examples, report


def read_dataset(paths: Union[str, os.PathLike, Sequence], format: str = "auto", split: Optional[str] = None,
                 image_root=None, on_error: str = "skip", log=None) -> TrainData:
    """Files (or folders) -> TrainData, concatenated in the order given. Empty result = an error."""
    log = log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    examples, reports = [], []
    for p in paths:
        got, report = read_file(p, format, split, image_root, on_error, log)
        examples += got
        reports.append(report)
    if not examples:
        raise DataError("no usable examples in " + "; ".join(r.summary() for r in reports))
    return TrainData(examples, reports)
