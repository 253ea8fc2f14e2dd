"""metrics.jsonl: one strict JSON object per line (a NaN or infinite number is written as null, since bare `NaN`
is not JSON and breaks the readers of the file)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..checkpoints.io import atomic_write_text
from ..plots import read_metrics


def finite_json(value):
    """`value` with every non-finite float replaced by None (in nested dicts and lists too)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_line(record: dict) -> str:
    return json.dumps(finite_json(record), allow_nan=False) + "\n"


def _record(line: str) -> Optional[dict]:
    """A line's record with an integer step, or None for lines that cannot be read."""
    try:
        record = json.loads(line)
        record["step"] = int(record["step"])
        return record
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl: appended and flushed line by line; on resume the lines past the checkpoint (and unreadable
    ones, such as the torn tail of a killed run) are dropped, so the file is always the run's own curve."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            records = [_record(line) for line in lines]
            keep = [r for r in records if r is not None and r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json_line(record) for record in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json_line(record))


def read_losses(path) -> dict:
    """{step: loss} from a metrics.jsonl (the last line of a step wins; steps whose batch was skipped for a
    non-finite loss have none)."""
    steps, _ = read_metrics(path)
    return {step: record["loss"] for step, record in steps.items() if record.get("loss") is not None}
