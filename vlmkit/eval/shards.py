"""Evaluation over several processes (`torchrun --nproc_per_node N -m vlmkit eval ...`): the predictions file each
process appends to, which items each one predicts, and the merge of all files into predictions.jsonl.

Every process reads every predictions file of the folder (predictions.jsonl and the predictions.rank*.jsonl a run
of any number of processes left), and the items none of them holds are dealt out a batch at a time, in turn: the
k-th missing item goes to process (k // batch_size) % N. So each process generates exactly the batches one process
would (the same items padded together: the same answers, even in bf16), the shares differ by one batch at most,
and the split depends on the files alone, never on timing. A killed run resumes with the same or another number of
processes: what the union of the files holds is done, the rest is dealt again. Once
all have finished, the first process merges the files in item order into predictions.jsonl (the file one process
writes) and removes the per-process ones.
"""

from __future__ import annotations

from pathlib import Path

from .predictions import PREDICTIONS, PredictionsFile, read_predictions, rewrite_predictions

_SHARD_GLOB = "predictions.rank*.jsonl"


def shard_path(folder: Path, rank: int) -> Path:
    """The file process `rank` appends its predictions to while several run."""
    return Path(folder) / f"predictions.rank{rank}.jsonl"


def shard_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(_SHARD_GLOB))


def read_all(folder: Path) -> dict[Path, PredictionsFile]:
    """Every predictions file of the folder: predictions.jsonl (when there), then the per-process files."""
    main = Path(folder) / PREDICTIONS
    paths = ([main] if main.is_file() else []) + shard_files(folder)
    return {path: read_predictions(path) for path in paths}


def owner(k: int, world: int, batch_size: int) -> int:
    """The process that predicts the k-th item (counting from 0) that no file holds yet."""
    return (k // batch_size) % world


def remove_all(folder: Path) -> None:
    """Drop every prediction of the folder (--overwrite)."""
    for path in [Path(folder) / PREDICTIONS, *shard_files(folder)]:
        path.unlink(missing_ok=True)


def merge(folder: Path, order: list) -> dict[str, dict]:
    """All files' lines as one predictions.jsonl: the items of `order` first, in that order, then any others (from
    an earlier run with a larger --limit) as they were. The per-process files are removed once it is written (a
    kill in between leaves them and the merged file holding the same lines: the next run reads them as one)."""
    lines: dict[str, dict] = {}
    for found in read_all(folder).values():
        lines.update(found.lines)
    wanted = set(order)
    ordered = [lines[rid] for rid in order if rid in lines] + [v for k, v in lines.items() if k not in wanted]
    rewrite_predictions(Path(folder) / PREDICTIONS, ordered)
    for path in shard_files(folder):
        path.unlink()
    return lines
