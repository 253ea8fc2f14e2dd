"""`vlmkit eval`: score a model on a benchmark stored on disk (vlmkit.eval.runner)."""

from __future__ import annotations

import os
import sys

from .common import MODEL, PROG, arg, command, load_model, positive_int, status


@command("eval", "score a model on a benchmark (vqav2, textvqa, docvqa, chartqa, mmmu, mmbench, synthetic, or a spec)",
         *MODEL,
         arg("--task", "-t", required=True, metavar="NAME", help="a built-in task, or a .yaml/.json task spec file"),
         arg("--data", "-d", default=None, metavar="PATH",
             help="the benchmark: parquet / JSON lines / JSON / TSV, or a folder (datasets save_to_disk, Hub layout)"),
         arg("--split", default=None, help="the split of a folder that holds several (default: validation)"),
         arg("--limit", type=positive_int, default=None, metavar="N", help="only the first N items"),
         arg("--batch-size", type=positive_int, default=8, metavar="B", help="prompts generated together (default 8)"),
         arg("--output", "-o", default=None, metavar="DIR",
             help="where predictions.jsonl, results.json and results.md go (default eval-results/TASK-MODEL); "
                  "a rerun with the same model and settings resumes, one with other settings is refused"),
         arg("--max-new-tokens", type=positive_int, default=None, metavar="N",
             help="answer length cap (default: the task's)"),
         arg("--image-root", default=None, metavar="DIR", help="the folder relative image paths start from"),
         arg("--seed", type=int, default=0, metavar="S", help="seed of MMMU's random choice for unreadable answers"),
         arg("--overwrite", action="store_true",
             help="drop the predictions already in --output instead of resuming (needed to rerun a folder with "
                  "other settings)"))
def cmd_eval(args) -> int:
    from ..eval.runner import evaluate

    results = evaluate(lambda: load_model(args), args.task, args.data, split=args.split, limit=args.limit,
                       batch_size=args.batch_size, output_dir=args.output, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, overwrite=args.overwrite, image_root=args.image_root, model_name=args.model,
                       load_options={"dtype": args.dtype, "quantize": args.quantize, "device": args.device})
    sys.stdout.write(results["markdown"])
    status(f"{PROG} eval: {results['n']} items ({results['failed']} failed); "
           f"predictions and results in {os.path.dirname(results['files']['results'])}")
    return 0
