"""The benchmark runner: batched generation over a task's rows, resumable predictions, scores and a table.

    from vlmkit.eval import evaluate
    results = evaluate("path/to/model", "vqav2", "vqav2_val.parquet", limit=500, batch_size=8, output_dir="out")
    results["metrics"]        # {"accuracy": 0.63}
    results["breakdown"]      # {"answer_type": {"yes/no": {"n": 190, "accuracy": 0.9}, ...}}

Files in `output_dir`:
    predictions.jsonl   one line per item, appended (and flushed) as each batch finishes: id, task, model, prompt,
                        prediction, the fields scoring needs (target, categories, options) and the settings that
                        change answers (see predictions.py). A rerun with the same task, model, settings and folder
                        skips the items already there, so an interrupted run resumes; one with other settings is
                        refused; a rerun with everything predicted only rescores, without loading the model.
                        Unreadable lines (the torn tail of a killed run) are dropped from the file.
    results.json        metrics, per-category breakdowns, counts and settings.
    results.md          the same as markdown tables (what `vlmkit eval` prints).
    results.png         the score per category (or the metrics) as horizontal bars, with the item counts; drawn
                        when matplotlib (the `plot` extra) is installed.

Items that fail (an unreadable image, a prompt longer than the context) are reported, scored as wrong and not
written, so the next run tries them again; a run in which nothing succeeds stops with the first error.

Several processes (`processes=`, a DistContext from torchrun): each predicts its share into its own file, the first
merges them into predictions.jsonl and writes the results (see shards.py); every process returns the results.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

from ..checkpoints.io import atomic_write_text
from ..data.files import Rows, read_rows, resolve_image
from ..distributed import DistContext
from ..plots import RESULTS_PNG, draw_if_possible, plot_eval
from . import shards
from .predictions import (HOW_TO_REDO, PREDICTIONS, check_settings, load_predictions, prediction_settings,
                          read_predictions, rewrite_predictions)
from .spec import get_task
from .tasks import Task

__all__ = ["evaluate", "results_markdown", "load_predictions", "PREDICTIONS", "RESULTS_JSON", "RESULTS_MD"]

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
_RESERVED = ("id", "task", "model", "prompt", "prediction", "settings", "error")
_MAX_SHOWN_ERRORS = 5


# ------------------------------------------------------------------------------------------------- model

def _model_name(model) -> str:
    """A stable name for a model: 'default', a resolved folder path, or the object's `name`."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        if name == "default":
            return name
        return str(Path(name).expanduser().resolve()) if Path(name).expanduser().is_dir() else name
    folder = getattr(model, "folder", None)
    if folder is not None:
        from ..api import default_model_path

        folder = Path(folder).resolve()
        return "default" if folder == default_model_path().resolve() else str(folder)
    return str(getattr(model, "name", None) or type(model).__name__)


def _materialize(model):
    """A model with generate_batch: as is, loaded from a folder / 'default', or built by a zero-argument factory."""
    if hasattr(model, "generate_batch"):
        return model
    if isinstance(model, (str, os.PathLike)):
        from ..api import load

        return load(model)
    if callable(model):
        return model()
    raise TypeError(f"evaluate() needs a VLM, a model folder or 'default', not a {type(model).__name__}")


# ------------------------------------------------------------------------------------------------ files

def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def _jsonable(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


# ------------------------------------------------------------------------------------------------ progress

class _Progress:
    """tqdm when it is installed, else a one-line counter on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.n, self.enabled, self.desc, self._t0, self._bar = total, 0, enabled, desc, time.time(), None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(k)
        else:
            rate = self.n / max(time.time() - self._t0, 1e-9)
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} ({rate:.1f} items/s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            if self._bar is not None:
                self._bar.close()
            else:
                sys.stderr.write("\n")


# ------------------------------------------------------------------------------------------------ running

def _messages(prompt, n_images: int):
    """A task's prompt as one user turn: its images first (as lmms-eval does), then the text."""
    if not isinstance(prompt, str):
        return prompt  # already chat messages
    return [{"role": "user", "content": [{"type": "image"} for _ in range(n_images)]
             + [{"type": "text", "text": prompt}]}]


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    parts = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.append("".join("<image>" if p.get("type") == "image" else p.get("text", "") for p in content))
    return "\n".join(parts)


def _generate(model, prompts: list, images: list, options: dict) -> list:
    """Answers for a batch; on an error, item by item, so one bad item costs only itself (it gets the exception)."""
    try:
        return list(model.generate_batch(prompts, images=images, **options))
    except Exception as e:  # noqa: BLE001 -- retried one by one below
        if len(prompts) == 1:
            return [e]
    out = []
    for prompt, imgs in zip(prompts, images):
        try:
            out.append(model.generate_batch([prompt], images=[imgs], **options)[0])
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out


def evaluate(model, task: Union[str, Task, dict], data=None, *, split: Optional[str] = None,
             limit: Optional[int] = None, batch_size: int = 8, output_dir=None,
             max_new_tokens: Optional[int] = None, seed: int = 0, progress: Optional[bool] = None,
             overwrite: bool = False, image_root=None, model_name: Optional[str] = None,
             load_options: Optional[dict] = None, log: Optional[Callable[[str], None]] = None,
             processes: Optional[DistContext] = None) -> dict:
    """Run `task` on `model` and score it. Returns the results dict (also written to `output_dir`).

    model: a loaded VLM (or anything with `generate_batch`), a model folder or "default", or a zero-argument
    factory (called only if something is left to predict). task: a built-in name (see `tasks.TASKS`), a Task, or
    a task spec (.yaml/.json path or dict). data: the benchmark file or folder (`data.files.read_rows`); split: the
    split of a DatasetDict / Hub folder. limit: only the first N rows. output_dir: default
    eval-results/<task>-<model>. seed: for MMMU's random fallback. progress: None = when stderr is a terminal.
    load_options: {"dtype", "quantize", "device"} the model is (to be) loaded with, when `model` is not a loaded
    VLM; no dtype means the device's compute dtype, as `vlmkit.load` picks it. dtype and quantize are kept with each
    prediction, with the generation settings: resuming with other ones is refused (overwrite=True starts over).
    Batch size and device are not among them: they change no answer beyond float rounding.
    processes: the torchrun processes to share the items among (`vlmkit.distributed.init_processes`); every one
    must call evaluate with the same arguments.
    """
    say = log or (lambda msg: (sys.stderr.write(msg + "\n"), sys.stderr.flush()))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    t = get_task(task)
    data = data if data is not None else t.data
    if t.docs is not None:
        rows: Rows = t.docs(data, split)
    elif data is None:
        raise ValueError(f"task {t.name!r} needs its benchmark data: pass --data FILE_OR_FOLDER")
    else:
        rows = read_rows(data, split)
    image_root = Path(image_root).expanduser() if image_root else None
    name = _model_name(model_name if model_name is not None else model)
    total = len(rows) if limit is None else min(limit, len(rows))
    if total == 0:
        raise ValueError(f"{rows.source} holds no rows")

    out_dir = Path(output_dir) if output_dir else Path("eval-results") / f"{t.name}-{_slug(name)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = processes or DistContext()
    pred_path = out_dir / PREDICTIONS
    own_path = pred_path if ctx.world == 1 else shards.shard_path(out_dir, ctx.rank)
    if overwrite and ctx.is_main:
        shards.remove_all(out_dir)
    ctx.barrier()
    gen = {"max_new_tokens": int(max_new_tokens or t.max_new_tokens), "do_sample": False}
    settings = prediction_settings(model, model_name, load_options, gen["max_new_tokens"], t.spec)
    files = shards.read_all(out_dir)
    done: dict[str, dict] = {}
    for path, stored in files.items():
        for line in stored.lines.values():
            if line.get("task") != t.name or line.get("model") != name:
                raise ValueError(f"{path} holds predictions of task {line.get('task')!r} by model "
                                 f"{line.get('model')!r}, not {t.name!r} by {name!r}; use another output folder or "
                                 f"--overwrite")
        check_settings(path, stored.lines, settings)
        done.update(stored.lines)
    ctx.barrier()  # every process has read the files before any writes: the shares depend on them
    stored = files.get(own_path)
    if stored is not None and stored.needs_rewrite:
        rewrite_predictions(own_path, stored.lines.values())
        if stored.unreadable:
            say(f"vlmkit eval: removed {stored.unreadable} unreadable line(s) from {own_path}")
    must_merge = ctx.world > 1 or any(path != pred_path for path in files)

    bar = _Progress(total, t.name if ctx.world == 1 else f"{t.name} (process {ctx.rank + 1} of {ctx.world})",
                    (sys.stderr.isatty() and ctx.is_main) if progress is None else progress)
    selected: list[str] = []
    row_fields: dict[str, dict] = {}
    missing = 0  # items no file holds so far: dealt out to the processes a batch at a time
    crashed: Optional[Exception] = None
    failed: dict[str, dict] = {}
    pending: list[tuple] = []
    state = {"model": None, "succeeded": 0, "errors": 0}
    started = time.time()

    def fail(rid: str, record: dict, prompt_text: str, error: BaseException) -> None:
        failed[rid] = {"id": rid, "task": t.name, "model": name, "prompt": prompt_text, "prediction": "",
                       **record, "error": f"{type(error).__name__}: {error}"}
        state["errors"] += 1
        if state["errors"] <= _MAX_SHOWN_ERRORS:
            say(f"vlmkit eval: item {rid} failed: {type(error).__name__}: {error}")
        if state["succeeded"] == 0 and state["errors"] >= max(8, 2 * batch_size):
            raise ValueError(f"every item so far failed; the first: {next(iter(failed.values()))['error']}")

    def flush(f) -> None:
        if not pending:
            return
        if state["model"] is None:
            state["model"] = _materialize(model)
        answers = _generate(state["model"], [p[1] for p in pending], [p[2] for p in pending], gen)
        lines = []
        for (rid, prompt, _imgs, record, prompt_text), answer in zip(pending, answers):
            if isinstance(answer, BaseException):
                fail(rid, record, prompt_text, answer)
                continue
            line = {"id": rid, "task": t.name, "model": name, "prompt": prompt_text,
                    "prediction": str(answer).strip(), **record, "settings": settings}
            done[rid] = line
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
            state["succeeded"] += 1
        if lines:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        bar.update(len(pending))
        pending.clear()

    try:
        with open(own_path, "a", encoding="utf-8") as f:
            seen: set[str] = set()
            for index, row in enumerate(rows):
                if index >= total:
                    break
                rid = t.doc_id(row, index)
                if rid in seen:
                    raise ValueError(f"{rows.source}: row {index} repeats the id {rid!r}")
                seen.add(rid)
                selected.append(rid)
                try:
                    record = {k: _jsonable(v) for k, v in t.record(row).items() if k not in _RESERVED}
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{rows.source}: row {index} (id {rid}): {e}") from None
                row_fields[rid] = record
                if rid not in done:
                    missing += 1
                    if shards.owner(missing - 1, ctx.world, batch_size) != ctx.rank:
                        bar.update(1)
                        continue
                try:
                    prompt, cells = t.build(row)
                except (OSError, ValueError, KeyError, TypeError) as e:
                    prompt, cells = e, []
                if rid in done:  # predicted before: rescored with this row's fields
                    _check_same_prompt(pred_path, done[rid], prompt)
                    bar.update(1)
                    continue
                try:
                    if isinstance(prompt, Exception):
                        raise prompt
                    images = [resolve_image(c, rows.root, image_root) for c in cells]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    fail(rid, record, "", e)
                    bar.update(1)
                    continue
                pending.append((rid, _messages(prompt, len(images)), images, record, _prompt_text(prompt)))
                if len(pending) >= batch_size:
                    flush(f)
            flush(f)
    except Exception as e:  # noqa: BLE001 -- every process learns of it below, so none waits for the others
        if ctx.world == 1:
            raise
        crashed = e
    finally:
        bar.close()

    if ctx.world > 1:
        why = None if crashed is None else f"{type(crashed).__name__}: {crashed}"
        shares = ctx.all_gather({"failed": failed, "error": why})
        if crashed is not None:
            raise crashed
        for rank, share in enumerate(shares):
            if share["error"] is not None:
                raise ValueError(f"process {rank} of the evaluation failed: {share['error']}")
        everyone = {rid: line for share in shares for rid, line in share["failed"].items()}
        failed = {rid: everyone[rid] for rid in selected if rid in everyone}  # in item order, as one process has it
    if must_merge:
        if ctx.is_main:
            done = shards.merge(out_dir, selected)
        ctx.barrier()  # the merged file is whole before the other processes read it
        if not ctx.is_main:
            done = read_predictions(pred_path).lines
    done = {rid: {**done[rid], **row_fields[rid]} for rid in selected if rid in done}  # scored with the rows' fields

    if failed and len(failed) == len(selected):
        raise ValueError(f"every item failed; the first: {next(iter(failed.values()))['error']}")
    records = [dict(done[rid]) if rid in done else dict(failed[rid]) for rid in selected]
    scored = t.score(records, seed)
    results = {
        "task": t.name, "description": t.description, "model": name, "data": rows.source, "split": split,
        "n": len(selected), "failed": len(failed),
        "counts": {"items": len(selected), "failed": len(failed), **scored.get("counts", {})},
        "metrics": scored.get("metrics", {}),
        "breakdown": scored.get("breakdown", {}),
        "settings": {"limit": limit, "batch_size": batch_size, "seed": seed, **settings},
        "errors": [failed[k]["error"] for k in list(failed)[:_MAX_SHOWN_ERRORS]],
        "seconds": round(time.time() - started, 3),
        "files": {"predictions": str(pred_path), "results": str(out_dir / RESULTS_JSON),
                  "markdown": str(out_dir / RESULTS_MD)},
    }
    markdown = results_markdown(results)
    if ctx.is_main:
        _write_json(out_dir / RESULTS_JSON, _jsonable(results))
        (out_dir / RESULTS_MD).write_text(markdown, encoding="utf-8")
    results["markdown"] = markdown
    if ctx.is_main:
        chart = out_dir / RESULTS_PNG
        draw_if_possible(lambda: plot_eval(results, chart), chart, "the chart", say, prefix="vlmkit eval: ")
    results["item_scores"] = scored.get("item_scores", {})
    return results


def _check_same_prompt(path: Path, line: dict, prompt) -> None:
    """An item predicted before must have been asked the same prompt (a changed template or data file would
    otherwise mix answers to two different questions)."""
    if isinstance(prompt, Exception) or line.get("prompt") == _prompt_text(prompt):
        return
    raise ValueError(f"{path}: item {line['id']} was predicted for the prompt {str(line.get('prompt'))[:80]!r}, but "
                     f"the task now asks {_prompt_text(prompt)[:80]!r} (the data or the prompt template changed); "
                     f"{HOW_TO_REDO}")


def _slug(name: str) -> str:
    base = Path(name).name if name not in ("default",) else name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "model"


# ------------------------------------------------------------------------------------------------ markdown

def _cell(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{100 * value:.2f}"
    return "" if value is None else str(value)


def results_markdown(results: dict) -> str:
    """Markdown tables of a results dict: the task's metrics (x100; CIDEr-D too, as papers print it), then one
    table per breakdown field (e.g. per category)."""
    task = results["task"]
    counts = dict(results.get("counts") or {"items": results["n"], "failed": results.get("failed", 0)})
    said = [f"{counts.pop('items')} items"] + [f"{v} {k.replace('_', ' ')}" for k, v in counts.items()
                                                 if v or k != "failed"]
    lines = [f"## {task}: {Path(str(results['model'])).name} ({', '.join(said)})", "",
             "| task | metric | value |", "|---|---|---:|"]
    for key, value in results["metrics"].items():
        lines.append(f"| {task} | {key} | {_cell(value)} |")
    for field_name, groups in results.get("breakdown", {}).items():
        if not groups:
            continue
        names = [k for k in next(iter(groups.values())) if k != "n"]
        lines += ["", f"**{task} by {field_name}**", "",
                  f"| {field_name} | n | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for value, stats in groups.items():
            lines.append(f"| {value} | {stats['n']} | " + " | ".join(_cell(stats[k]) for k in names) + " |")
    return "\n".join(lines) + "\n"
