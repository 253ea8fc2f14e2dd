"""Writing files so that a crash never leaves a half-written one: `atomic_write` writes a temp file in the same
folder, fsyncs it and renames it over the target; a write cut short leaves the old file whole and at most a
`.NAME.*.tmp` file behind (`temp_files` finds those). And `read_json`, for a folder's optional JSON files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text", "read_json", "temp_files"]


def read_json(path) -> dict:
    """A JSON file's content, {} when the file is absent (a folder's optional config files)."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path, write: Callable[[str], None]) -> None:
    """`write(temp_path)` fills a temp file beside `path`, which then replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def temp_files(path) -> list[Path]:
    """The temp files that writes of `path` cut short left in its folder."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.glob(_temp_prefix(path) + "*.tmp") if p.is_file()]
