"""predictions.jsonl: reading it back, rewriting it without its unreadable lines, and the settings every line
carries so that a resume never mixes answers made under different settings.

Each line is one item's prediction plus `settings`: what changes the answers (generation length, greedy decoding,
dtype, quantization, the model folder's files, a spec task's prompt template). A resume whose settings differ is
refused; one with the same settings appends to the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

from ..checkpoints.io import atomic_write_text
from ..hardware import compute_dtype

PREDICTIONS = "predictions.jsonl"
_HASHED_WHOLE = 1 << 20  # model files up to this size are hashed by content; bigger ones by size and mtime
HOW_TO_REDO = "rerun with --overwrite (overwrite=True) to replace them, or write to another --output folder"


@dataclass
class PredictionsFile:
    """What a predictions file holds: its lines by id (the last one wins), and whether it has lines that must go
    (unreadable ones, a torn last line, repeated ids, a missing final newline)."""

    lines: dict = field(default_factory=dict)
    unreadable: int = 0
    needs_rewrite: bool = False


def read_predictions(path: Union[str, Path]) -> PredictionsFile:
    """Read a predictions file without changing it. A line that is not a JSON object with an id and a prediction
    (garbage, or the torn tail of a run killed mid-write) is counted as unreadable."""
    path = Path(path)
    found = PredictionsFile()
    if not path.is_file():
        return found
    data = path.read_bytes()
    kept = 0
    for raw in data.splitlines():
        if not raw.strip():
            found.needs_rewrite = True
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not (isinstance(line, dict) and "id" in line and "prediction" in line):
            found.unreadable += 1
            continue
        found.lines[str(line["id"])] = line
        kept += 1
    found.needs_rewrite = (found.needs_rewrite or found.unreadable > 0 or kept != len(found.lines)
                           or (bool(data) and not data.endswith(b"\n")))
    return found


def load_predictions(path: Union[str, Path]) -> dict[str, dict]:
    """The readable lines of a predictions file by id (the last one wins)."""
    return read_predictions(path).lines


def rewrite_predictions(path: Union[str, Path], lines: Iterable[dict]) -> None:
    """Replace the file by `lines` (atomically: a kill mid-way leaves the old file whole)."""
    atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


# ------------------------------------------------------------------------------------------------ settings

def model_files_fingerprint(folder: Optional[Union[str, Path]]) -> Optional[str]:
    """A short hash of a model folder's files (not the .md ones): small files (configs, chat template, tokenizer)
    by content, big ones (weights) by name, size and modification time, so re-trained weights saved into the same
    folder count as another model without reading gigabytes."""
    if folder is None or not Path(folder).is_dir():
        return None
    h = hashlib.sha256()
    for entry in sorted(Path(folder).iterdir()):
        if not entry.is_file() or entry.suffix.lower() == ".md":
            continue
        st = entry.stat()
        h.update(entry.name.encode() + b"\0")
        if st.st_size <= _HASHED_WHOLE:
            h.update(entry.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _model_folder(model, model_name) -> Optional[Path]:
    """The folder the model's weights come from, if it is known without loading the model."""
    for candidate in (getattr(model, "folder", None), model_name, model):
        if isinstance(candidate, (str, os.PathLike)):
            if str(candidate) == "default":
                from ..api import default_model_path

                return default_model_path()
            if Path(candidate).expanduser().is_dir():
                return Path(candidate).expanduser()
    return None


_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _load_options(model, given: Optional[dict]) -> dict:
    """dtype and quantization: as given (the CLI's --dtype / --quantize / --device; no dtype = the one the device
    computes in, as `vlmkit.load` picks it, so a resume on a machine that picks another is noticed), else read off a
    loaded model."""
    if given is not None:
        dtype = given.get("dtype")
        if dtype is None:
            dtype = compute_dtype(given.get("device"))
        dtype = _DTYPE_NAMES.get(str(dtype), str(dtype).removeprefix("torch."))
        adapter = {"adapter": model_files_fingerprint(given["adapter"])} if given.get("adapter") else {}
        return {"dtype": dtype, "quantize": given.get("quantize"), **adapter}
    module = getattr(model, "model", None)
    dtype = getattr(module, "dtype", None)
    quantization = getattr(model, "quantization", None)
    return {"dtype": "as stored" if dtype is None else str(dtype).removeprefix("torch."),
            "quantize": quantization.get("mode") if isinstance(quantization, dict) else None}


def prediction_settings(model, model_name, load_options: Optional[dict], max_new_tokens: int, spec: dict) -> dict:
    """What changes the answers, known without loading the model: kept with every prediction line."""
    return {"max_new_tokens": max_new_tokens, "greedy": True, **_load_options(model, load_options),
            "model_files": model_files_fingerprint(_model_folder(model, model_name)),
            "task_prompt": {k: spec[k] for k in ("prompt", "image_field", "options_field") if k in spec} or None}


def _shown(value) -> str:
    return "none" if value is None else str(value)


def check_settings(path: Path, lines: dict, settings: dict) -> None:
    """Refuse to resume into predictions made with other settings, naming what differs and how to proceed."""
    how = HOW_TO_REDO + " to keep both"
    for line in lines.values():
        stored = line.get("settings")
        if not isinstance(stored, dict):
            raise ValueError(f"{path} holds predictions without the settings they were made with (written by an "
                             f"older vlmkit), so they cannot be resumed safely; {how}")
        if stored != settings:
            keys = sorted(set(stored) | set(settings), key=lambda k: (k not in settings, k))
            diff = [f"{k} {_shown(stored.get(k))} (now {_shown(settings.get(k))})" for k in keys
                    if stored.get(k) != settings.get(k)]
            raise ValueError(f"{path} holds predictions made with other settings: {'; '.join(diff)}; {how}")
