"""Pictures of runs: a training run's curves (loss.png from metrics.jsonl), an evaluation's scores per category
(results.png beside results.md), and the horizontal bar charts the benchmarks draw from their tables.

matplotlib is the optional `plot` extra (`pip install 'vlmkit[plot]'`); without it every function here raises
PlotUnavailable with that command. Figures are drawn on matplotlib's Agg canvas (`Figure`, never pyplot), so
nothing needs a screen and the caller's own matplotlib backend is left alone. A picture is written to a temporary
file and renamed, so a viewer reloading it during a run never reads half a PNG.

    plot_training("runs/finetune")                 # -> runs/finetune/loss.png
    plot_eval(results, "eval-results/x/results.png")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["INSTALL_HINT", "PlotUnavailable", "read_metrics", "plot_training", "plot_eval", "bar_chart", "figure",
           "save_png", "draw_if_possible", "LOSS_PNG", "RESULTS_PNG"]

INSTALL_HINT = "pip install 'vlmkit[plot]'"
LOSS_PNG, RESULTS_PNG = "loss.png", "results.png"
_DPI = 110


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def figure(width: float, height: float):
    """A matplotlib Figure (inches) laid out without overlaps; PlotUnavailable without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(f"drawing plots needs matplotlib: {INSTALL_HINT}") from None
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def save_png(fig, path) -> Path:
    """Write `fig` as a PNG at `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def draw_if_possible(draw: Callable[[], Path], path: Path, what: str, say: Callable[[str], None], prefix: str = "",
                     then: str = "") -> Optional[Path]:
    """`draw()` (a plot_* call writing `path`), for a run whose results do not depend on the picture: a missing
    matplotlib or a failed drawing is said (`prefix` first, `then` after the install hint), never raised."""
    try:
        return draw()
    except PlotUnavailable:
        say(f"{prefix}no {path.name}: drawing {what} needs matplotlib ({INSTALL_HINT}){then}")
    except Exception as e:  # noqa: BLE001 -- the picture is optional; the run's results are not
        say(f"{prefix}warning: could not draw {path}: {type(e).__name__}: {e}")
    return None


def _plain(text) -> str:
    """Text shown as written: matplotlib reads a pair of `$` as math."""
    return str(text).replace("$", r"\$")


# ------------------------------------------------------------------------------------------------ training

def read_metrics(path) -> tuple[dict, dict]:
    """(steps, evals) from a metrics.jsonl: {step: training record} and {step: {metric: value}} (the one reader of
    the file: model cards and train.metrics_log.read_losses use it too). Lines that are not a JSON object with a
    step (the half-written last line of a running or killed run) are passed over; the last line of a step wins."""
    steps, evals = {}, {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(record.get("eval"), dict):
                evals[step] = {k: v for k, v in record["eval"].items() if _number(v)}
            else:
                steps[step] = record
    return steps, evals


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(steps: dict, key: str) -> tuple[list, list]:
    xs = [s for s in sorted(steps) if _number(steps[s].get(key))]
    return xs, [steps[s][key] for s in xs]


def _running_mean(values: list, window: int) -> list:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(run_dir, out: Optional[os.PathLike] = None, metrics: str = "metrics.jsonl") -> Path:
    """Draw a training run's loss, learning rate and gradient norm against the step (and its evaluations, when it
    logged some) from RUN_DIR/metrics.jsonl; returns the PNG's path (default RUN_DIR/loss.png). Safe to call while
    the run is still writing the file."""
    run_dir = Path(run_dir)
    source = run_dir / metrics
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: is {run_dir} the --out folder of a `vlmkit train` run?")
    steps, evals = read_metrics(source)
    if not steps:
        raise ValueError(f"{source} holds no training step yet")
    panels = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)")]
    eval_names = sorted({k for record in evals.values() for k in record})
    fig = figure(8, 2.2 * (len(panels) + bool(eval_names)) + 0.6)
    axes = fig.subplots(len(panels) + bool(eval_names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, label) in zip(axes, panels):
        xs, ys = _series(steps, key)
        if key == "loss" and len(ys) >= 100:  # a noisy curve: the running mean shows the trend
            ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
            window = max(2, len(ys) // 50)
            ax.plot(xs, _running_mean(ys, window), color="tab:blue", linewidth=1.6,
                    label=f"mean of {window} steps")
            ax.legend(loc="upper right", fontsize="small")
        else:
            ax.plot(xs, ys, color="tab:blue", linewidth=1.2, marker="." if len(ys) < 30 else None)
        if key == "grad_norm" and ys and min(ys) > 0 and max(ys) / min(ys) > 50:
            ax.set_yscale("log")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        for step in evals:
            ax.axvline(step, color="tab:orange", alpha=0.35, linewidth=0.8, linestyle="--")
        ax.set_ylabel(label, fontsize="small")
        ax.grid(alpha=0.3)
        if not ys:
            ax.text(0.5, 0.5, f"no {label} logged", ha="center", va="center", transform=ax.transAxes)
    if eval_names:
        ax = axes[-1]
        for name in eval_names:
            xs = [s for s in sorted(evals) if name in evals[s]]
            ax.plot(xs, [evals[s][name] for s in xs], marker="o", linewidth=1.2, label=_plain(name))
        ax.set_ylabel("evaluation", fontsize="small")
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator  # present: figure() found matplotlib

    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    last = max(steps)
    loss = steps[last].get("loss")
    fig.suptitle(f"{_plain(run_dir.resolve().name)}: {len(steps)} steps, last step {last}"
                 + (f", loss {loss:.4f}" if _number(loss) else ""), fontsize="medium")
    return save_png(fig, Path(out) if out is not None else run_dir / LOSS_PNG)


# ------------------------------------------------------------------------------------------------ charts

def bar_chart(ax, labels: Sequence[str], values: Sequence[Optional[float]], unit: str, title: str = "",
              notes: Optional[Sequence[str]] = None, fmt: str = "{:.3g}", color="tab:blue",
              limit: Optional[float] = None) -> None:
    """Horizontal bars on `ax`, first label at the top, each bar's value written at its end (with `notes[i]` after
    it, e.g. an item count); a missing value (None) is drawn as "n/a". `color`: one, or one per bar."""
    ys = list(range(len(labels)))
    shown = [v if v is not None else 0.0 for v in values]
    ax.barh(ys, shown, color=color, height=0.6)
    ax.set_yticks(ys, labels=[_plain(label) for label in labels], fontsize="small")
    ax.invert_yaxis()
    top = limit if limit is not None else max([v for v in shown if v > 0] or [1.0])
    ax.set_xlim(0, top * 1.3)  # room for the value written after the longest bar
    ax.set_xticks([t for t in ax.get_xticks() if 0 <= t <= top * 1.02])  # no scale past the top value
    for y, v, note in zip(ys, values, notes or [""] * len(ys)):
        text = "n/a" if v is None else fmt.format(v)
        ax.text((v or 0.0) + top * 0.01, y, f" {text}{'  ' + note if note else ''}", va="center", fontsize="small")
    ax.set_xlabel(unit)
    if title:
        ax.set_title(_plain(title), fontsize="medium", loc="left")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _score_rows(results: dict) -> list[tuple[str, list, list, list]]:
    """(title, labels, values x100, item counts) per panel: each breakdown field, else the task's metrics."""
    panels = []
    for field, groups in (results.get("breakdown") or {}).items():
        if not groups:
            continue
        metric = next((k for k in next(iter(groups.values())) if k != "n"), None)
        if metric is None:
            continue
        labels = list(groups)
        values = [100 * groups[k][metric] if _number(groups[k].get(metric)) else None for k in labels]
        panels.append((f"{metric} by {field}", labels, values, [f"n={groups[k]['n']}" for k in labels]))
    if not panels:
        metrics = {k: v for k, v in (results.get("metrics") or {}).items()}
        labels = list(metrics)
        values = [100 * v if _number(v) else None for v in metrics.values()]
        panels.append(("metrics", labels, values, [f"n={results.get('n', '?')}"] * len(labels)))
    return panels


def plot_eval(results: dict, out) -> Path:
    """A results dict of `vlmkit.eval.evaluate` as horizontal bars: the score (x100, as results.md prints it) per
    category of each breakdown field, with the number of items; a task without categories shows its metrics."""
    panels = _score_rows(results)
    heights = [max(1.2, 0.32 * len(labels) + 0.8) for _, labels, _, _ in panels]
    fig = figure(8, sum(heights) + 0.6)
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (title, labels, values, counts) in zip(axes, panels):
        best = max([v for v in values if v is not None] or [0.0])
        bar_chart(ax, labels, values, "score x 100 (as in results.md)", title, counts, fmt="{:.1f}",
                  limit=max(100.0, best))
    said = f"{results.get('n', '?')} items" + (f", {results['failed']} failed" if results.get("failed") else "")
    overall = ", ".join(f"{k} {100 * v:.1f}" for k, v in (results.get("metrics") or {}).items() if _number(v))
    fig.suptitle(_plain(f"{results.get('task', '')}: {Path(str(results.get('model', ''))).name} ({said})"
                        + (f"\n{overall}" if overall and panels[0][0] != "metrics" else "")), fontsize="medium")
    return save_png(fig, out)
