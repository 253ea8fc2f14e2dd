"""The speed and memory tables of bench/results.md as bar charts, next to it (bench/*.png): read from the Markdown
the bench writes, so the pictures can be redrawn from the committed numbers without measuring again.

    python -m bench.charts                     # bench/results.md -> bench/decode.png, vlm.png, scale.png
    python -m bench.charts --results other.md --out-dir /tmp/charts

`python -m bench` (run.py) draws them after writing results.md; a table missing from the file (a section the run
skipped) is passed over with a line saying so. Needs matplotlib (`pip install 'vlmkit[plot]'`).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vlmkit.plots import PlotUnavailable, bar_chart, figure, save_png

HERE = Path(__file__).resolve().parent


@dataclass
class Chart:
    png: str
    heading: str  # the start of the `## ` heading whose first table is drawn
    title: str
    panels: tuple  # (column header, axis label, value format[, which number of the cell]) per panel, top to bottom


CHARTS = (
    Chart("decode.png", "Decode:", "Decode speed: SmolLM2-135M (Q4_1 GGUF), greedy, 128 new tokens, prefill excluded",
          (("tok/s batch 1", "tokens/s at batch 1 (higher is better)", "{:.1f}"),
           ("tok/s batch 8", "tokens/s at batch 8 (higher is better)", "{:.1f}"))),
    Chart("vlm.png", "VLM:", "The default model (Idefics3 layout): image + question",
          (("time to first token", "time to first token, ms (lower is better)", "{:.0f} ms"),
           ("second turn", "second turn's time to first token, ms (lower is better)", "{:.0f} ms"),
           ("peak memory", "peak memory of loading + one answer, MiB above the process after imports (lower is "
            "better)", "{:,.0f} MiB"))),
    Chart("scale.png", "Real size", "LLaVA-1.5-shaped 1.5B checkpoint (576 image tokens + question), 2-core CPU",
          (("TTFT s", "time to first token, s (lower is better)", "{:.1f} s"),
           ("decode tok/s b=1", "decode tokens/s at batch 1 (higher is better)", "{:.2f}"),
           ("decode tok/s b=8", "decode tokens/s at batch 8 (higher is better)", "{:.1f}"),
           ("peak load RSS GB (anon)", "peak anonymous memory while loading, GB above the process after imports "
            "(lower is better)", "{:.2f} GB", 1))),
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def tables(markdown: str) -> dict[str, tuple[list, list]]:
    """{`## ` heading: (header cells, rows of cells)} of the first table under each heading."""
    out, heading, lines = {}, None, markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and heading is not None and heading not in out:
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            rows = [r for r in block[1:] if not all(set(c) <= set("-: ") for c in r)]
            out[heading] = (block[0], rows)
            continue
        i += 1
    return out


def number(cell: str, which: int = 0) -> Optional[float]:
    """The `which`-th number of a cell ("1,117 MiB" -> 1117, "8.00 (5.36)" -> 8.0 or, which=1, 5.36); None for
    "n/a" or "-"."""
    found = _NUMBER.findall(cell)
    return float(found[which].replace(",", "")) if len(found) > which else None


def _color(label: str) -> str:
    return "tab:blue" if label.startswith("vlmkit") else "tab:gray"


def draw(chart: Chart, header: list, rows: list, out: Path) -> Path:
    labels = [r[0] for r in rows]
    fig = figure(9, len(chart.panels) * (0.34 * len(labels) + 1.0) + 0.8)
    axes = fig.subplots(len(chart.panels), 1, squeeze=False)[:, 0]
    for ax, (column, unit, fmt, *which) in zip(axes, chart.panels):
        if column not in header:
            raise ValueError(f"the {chart.heading!r} table has no column {column!r} (it has {header})")
        k = header.index(column)
        bar_chart(ax, labels, [number(r[k], *which) for r in rows], unit, fmt=fmt,
                  color=[_color(x) for x in labels])
    fig.suptitle(f"{chart.title}\nblue: vlmkit, grey: the other libraries; numbers, machine and date: "
                 f"bench/results.md", fontsize="medium")
    return save_png(fig, out)


def draw_all(results: Path, out_dir: Path, log=print) -> list[Path]:
    found = tables(results.read_text(encoding="utf-8"))
    written = []
    for chart in CHARTS:
        heading = next((h for h in found if h.startswith(chart.heading)), None)
        if heading is None:
            log(f"bench charts: {results} has no '## {chart.heading}' table; {chart.png} not drawn")
            continue
        written.append(draw(chart, *found[heading], out_dir / chart.png))
        log(f"bench charts: wrote {written[-1]}")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.charts", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(HERE / "results.md"), help="the bench's Markdown (default %(default)s)")
    p.add_argument("--out-dir", default=str(HERE), help="where the PNGs go (default %(default)s)")
    a = p.parse_args(argv)
    try:
        draw_all(Path(a.results), Path(a.out_dir))
    except PlotUnavailable as e:
        sys.exit(f"bench charts: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
