"""`vlmkit plot RUN_DIR`: draw (or redraw) a training run's loss.png from its metrics.jsonl, also while it runs."""

from __future__ import annotations

import os

from .common import PROG, CLIError, arg, command, status


@command("plot", "draw a training run's curves (loss, lr, grad norm, evaluations) as RUN_DIR/loss.png",
         arg("run_dir", metavar="RUN_DIR", help="the --out folder of a `vlmkit train` run (holds metrics.jsonl)"),
         arg("--out", "-o", default=None, metavar="PNG", help="where to write the picture (default RUN_DIR/loss.png)"),
         description="Draw a training run's loss, learning rate and gradient norm against the step (its periodic "
                     "evaluations too, when it ran some) from RUN_DIR/metrics.jsonl into RUN_DIR/loss.png. Works "
                     "during a run. Needs matplotlib: pip install 'vlmkit[plot]'.")
def cmd_plot(args) -> int:
    from ..plots import PlotUnavailable, plot_training

    if not os.path.isdir(args.run_dir):
        raise CLIError(f"{args.run_dir!r} is not a folder; give the --out folder of a `vlmkit train` run")
    try:
        path = plot_training(args.run_dir, args.out)
    except PlotUnavailable as e:
        raise CLIError(str(e)) from None
    status(f"{PROG} plot: wrote {path}")
    return 0
