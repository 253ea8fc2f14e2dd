"""Generic row and image readers for data files in their public formats, shared by the eval harness (benchmarks)
and the fine-tuning readers (training sets).

    from vlmkit.data.files import read_rows, resolve_image
    rows = read_rows("vqav2_val.parquet")       # parquet / arrow / JSON lines / JSON / TSV / a `datasets` folder
    len(rows), next(iter(rows)), rows.root      # rows are dicts, read lazily; relative images resolve against root
    resolve_image(row["image"], rows.root)      # HF Image struct, bytes, path, data: URI, URL or bare base64
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

__all__ = ["Rows", "read_rows", "resolve_image", "DATA_EXTENSIONS", "SPLIT_PREFERENCE"]

DATA_EXTENSIONS = (".parquet", ".arrow", ".jsonl", ".ndjson", ".json", ".tsv")
SPLIT_PREFERENCE = ("validation", "val", "dev", "test", "testmini", "train")


class Rows:
    """Rows of a data file (dicts), read lazily; `len()` is known up front, `root` is the folder that
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
        raise ImportError("reading parquet / arrow files needs pyarrow: pip install 'vlmkit[train]' "
                          "(or 'vlmkit[eval]')") from None
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


# ------------------------------------------------------------------------------------------------ images

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

