"""`vlmkit eval`: score a model on one benchmark or several in one run (vlmkit.eval.runner).

`--tasks a,b` as lmms-eval takes it; lmms-eval's names of the tasks vlmkit implements are aliases of vlmkit's own
(vqav2_val -> vqav2, ...). The model loads once, at the first task that has something left to predict.
Under torchrun (`torchrun --nproc_per_node N -m vlmkit eval ...`) the processes share each task's items, each on its
own device (cuda:LOCAL_RANK with --device auto or cuda), and the first one prints the results.
"""

from __future__ import annotations

import os
import sys

from .common import MODEL, PROG, REMOTE_IMAGES, CLIError, arg, command, load_model, positive_int, status

# lmms-eval's task names -> vlmkit's task that scores the same split the same way.
LMMS_EVAL_ALIASES = {"vqav2_val": "vqav2", "textvqa_val": "textvqa", "docvqa_val": "docvqa", "chartqa": "chartqa",
                     "mmmu_val": "mmmu", "mmbench_en_dev": "mmbench"}
# lmms-eval tasks whose split has no public answers: lmms-eval writes a file for the benchmark's server instead.
SUBMISSION_ONLY = {"vqav2_test": "vqav2_val", "textvqa_test": "textvqa_val", "docvqa_test": "docvqa_val",
                   "mmmu_test": "mmmu_val", "mmbench_en_test": "mmbench_en_dev"}


def task_list(args) -> list[str]:
    """--tasks (comma-separated) and/or --task, aliases resolved, each once, in order."""
    names = []
    if args.tasks is not None:
        names = [n.strip() for n in args.tasks.split(",")]
        if not all(names):
            raise CLIError(f"--tasks {args.tasks!r} has an empty name; give names separated by commas, e.g. "
                           "--tasks vqav2_val,chartqa")
    if args.task:
        names.append(args.task)
    if not names:
        raise CLIError("no task given: --tasks NAME[,NAME...] (or --task NAME)")
    out = []
    for name in names:
        if name in SUBMISSION_ONLY:
            raise CLIError(f"task {name!r}: that split has no public answers (lmms-eval writes a file for the "
                           f"benchmark's server); vlmkit scores splits with answers, e.g. {SUBMISSION_ONLY[name]!r}")
        name = LMMS_EVAL_ALIASES.get(name, name)
        if name not in out:
            out.append(name)
    return out


def data_for(tasks: list[str], values: list[str]) -> dict[str, str]:
    """--data values -> {task: path}: `TASK=PATH` names its task (a vlmkit or lmms-eval name); plain paths go, in
    order, to the tasks not named that need data (every task but `synthetic` and specs that name their data)."""
    from ..eval.spec import get_task

    named: dict[str, str] = {}
    plain: list[str] = []
    for value in values:
        key, sep, path = value.partition("=")
        key = LMMS_EVAL_ALIASES.get(key, key)
        if sep and key in tasks:
            if key in named:
                raise CLIError(f"--data for task {key!r} given twice")
            named[key] = path
        else:
            plain.append(value)
    if not plain:
        return named
    if len(tasks) == 1:
        if named or len(plain) > 1:
            raise CLIError(f"--data given {len(values)} times for one task")
        return {tasks[0]: plain[0]}
    waiting = []
    for name in tasks:
        if name in named:
            continue
        try:
            t = get_task(name)
        except (ValueError, OSError) as e:
            raise CLIError(str(e)) from None
        if t.docs is None and t.data is None:
            waiting.append(name)
    if len(plain) != len(waiting):
        raise CLIError(f"{len(plain)} --data path(s) for {len(waiting)} task(s) that need data "
                       f"({', '.join(waiting) or 'none'}); give one per task, in order, or as TASK=PATH")
    return {**named, **dict(zip(waiting, plain))}


@command("eval", "score a model on benchmarks (vqav2, textvqa, docvqa, chartqa, mmmu, mmbench, synthetic, or a spec)",
         *MODEL, REMOTE_IMAGES,
         arg("--tasks", default=None, metavar="A,B",
             help="tasks separated by commas: built-in names, lmms-eval's names of them (vqav2_val, textvqa_val, "
                  "docvqa_val, chartqa, mmmu_val, mmbench_en_dev), or .yaml/.json task spec files"),
         arg("--task", "-t", default=None, metavar="NAME", help="one task (the same as --tasks NAME)"),
         arg("--data", "-d", action="append", default=None, metavar="PATH",
             help="the benchmark: parquet / JSON lines / JSON / TSV, or a folder (datasets save_to_disk, Hub "
                  "layout); with several tasks, once per task that needs data, in order, or as TASK=PATH"),
         arg("--split", default=None, help="the split of a folder that holds several (default: validation)"),
         arg("--limit", type=positive_int, default=None, metavar="N", help="only the first N items of each task"),
         arg("--batch-size", type=positive_int, default=8, metavar="B", help="prompts generated together (default 8)"),
         arg("--output", "-o", default=None, metavar="DIR",
             help="where predictions.jsonl, results.json and results.md go (default eval-results/TASK-MODEL; with "
                  "several tasks, DIR/TASK); a rerun with the same model and settings resumes, one with other "
                  "settings is refused"),
         arg("--max-new-tokens", type=positive_int, default=None, metavar="N",
             help="answer length cap (default: the task's)"),
         arg("--image-root", default=None, metavar="DIR", help="the folder relative image paths start from"),
         arg("--seed", type=int, default=0, metavar="S", help="seed of MMMU's random choice for unreadable answers"),
         arg("--overwrite", action="store_true",
             help="drop the predictions already in --output instead of resuming (needed to rerun a folder with "
                  "other settings)"))
def cmd_eval(args) -> int:
    from ..eval.runner import evaluate

    tasks = task_list(args)
    data = data_for(tasks, args.data or [])
    processes = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..distributed import init_processes

        try:
            processes = init_processes(args.device, timeout_minutes=24 * 60)  # one done early waits for the rest
        except ValueError as e:  # an unavailable --device
            raise CLIError(str(e)) from None
        args.device = str(processes.device)
    quiet = processes is not None and not processes.is_main  # the first process prints the results
    loaded = []

    def model():  # one load for every task, and none when every task is already predicted
        if not loaded:
            loaded.append(load_model(args))
        return loaded[0]

    summary = []
    for task in tasks:
        output = args.output if args.output is None or len(tasks) == 1 else os.path.join(
            args.output, os.path.splitext(os.path.basename(task))[0])
        results = evaluate(model, task, data.get(task), split=args.split, limit=args.limit,
                           batch_size=args.batch_size, output_dir=output, max_new_tokens=args.max_new_tokens,
                           seed=args.seed, overwrite=args.overwrite, image_root=args.image_root,
                           model_name=args.model, load_options={"dtype": args.dtype, "quantize": args.quantize,
                                                                "device": args.device, "adapter": args.adapter},
                           processes=processes)
        summary += metric_rows(results["markdown"])
        if quiet:
            continue
        sys.stdout.write(results["markdown"] + ("\n" if len(tasks) > 1 else ""))
        sys.stdout.flush()
        status(f"{PROG} eval: {task}: {results['n']} items ({results['failed']} failed); "
               f"predictions and results in {os.path.dirname(results['files']['results'])}")
    if processes is not None:
        from ..distributed import shutdown

        shutdown(processes)
    if len(tasks) > 1 and not quiet:  # every task's metrics in one table, as lmms-eval ends
        sys.stdout.write("\n".join([f"## all tasks ({len(tasks)})", "", "| task | metric | value |",
                                    "|---|---|---:|", *summary]) + "\n")
    return 0


def metric_rows(markdown: str) -> list[str]:
    """The rows of a task's `| task | metric | value |` table in its results.md text."""
    lines = markdown.splitlines()
    try:
        start = lines.index("| task | metric | value |") + 2
    except ValueError:
        return []
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows
