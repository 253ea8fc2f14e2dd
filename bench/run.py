"""`python -m bench` (or `python bench/run.py`), from a source checkout: vlmkit against transformers and llama.cpp in
ONE run, on the same checkpoints and prompts, written to bench/results.md with every target of issue 6 and its
measured ratio. (`vlmkit bench` times one model alone, from an installed package: vlmkit/benchmark.py.)

Needs the dev extra (transformers) for the transformers rows and, for the llama.cpp row, llama-cpp-python (no wheel
for this platform: `pip install llama-cpp-python` compiles llama.cpp). Rows whose peer is missing say so."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import charts  # noqa: E402
from common import MODES, child_peak_memory, machine  # noqa: E402
from report import render  # noqa: E402


SECTIONS = {"decode": "decode", "vlm": "vlm", "memory": "memory", "accuracy": "accuracy", "profile": "profiles"}


def carry_over(results: dict, old: dict, skipped: list) -> None:
    """Copy the `skipped` sections of an earlier run's results into `results`, saying which and from when."""
    keys = [SECTIONS[s] for s in skipped if SECTIONS[s] in old]
    results.update({k: old[k] for k in keys})
    if keys:
        results["carried"] = {"sections": keys, "date": old["date"], "command": old["command"],
                              "machine": old["machine"]}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--model", default="default", help="the VLM to time (default: the embedded model, else "
                   "runs/default, else the default architecture with random vision weights)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="only float32 and this mode")
    p.add_argument("--out", default=str(HERE / "results.md"))
    p.add_argument("--threads", type=int, default=None, help="torch / llama.cpp threads (default: all cores)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--eval-limit", type=int, default=450, help="items of the default model's benchmark (0: skip)")
    p.add_argument("--skip", action="append", default=[], choices=list(SECTIONS))
    p.add_argument("--keep", action="store_true", help="take the skipped sections from the existing results (the "
                   "report names that run and its machine), e.g. to rerun only the accuracy after retraining the "
                   "default model")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    modes = MODES if args.quantize is None else ("float32", args.quantize)
    started = time.time()
    out = Path(args.out)
    if args.keep and not out.with_suffix(".json").is_file():
        sys.exit(f"--keep: no earlier results to keep sections from ({out.with_suffix('.json')} does not exist)")
    earlier = json.loads(out.with_suffix(".json").read_text()) if args.keep else None  # before the minutes of work
    results = {"machine": machine(), "modes": list(modes), "threads": threads,
               "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}

    def log(msg):
        sys.stderr.write(f"[bench {time.time() - started:6.0f}s] {msg}\n")
        sys.stderr.flush()

    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-") as tmp:
        work = Path(tmp)
        if "decode" not in args.skip:
            import decode

            results["decode"] = decode.measure(args.new_tokens, args.repeat, threads, log)
        import vlm

        folders = vlm.model_folders(work, args.model, log)
        results["folders"] = {k: str(v) for k, v in folders.items()}
        results["trained"] = bool(folders["trained"])
        if "vlm" not in args.skip:
            results["vlm"] = vlm.measure(folders, modes, max(3, args.repeat), log)
        if "memory" not in args.skip:
            mem = {}
            for mode in modes:
                mem[f"vlmkit {mode}"] = child_peak_memory("vlmkit", folder=str(folders["adapter"]), mode=mode)
                log(f"peak memory vlmkit {mode}: {mem[f'vlmkit {mode}']['delta'] / 2**20:.0f} MiB")
            try:
                mem["transformers float32"] = child_peak_memory("transformers", folder=str(folders["full"]))
            except RuntimeError as e:
                mem["transformers float32"] = {"error": str(e)[-300:]}
            results["memory"] = mem
        if args.eval_limit and "accuracy" not in args.skip:
            import accuracy

            if folders["trained"]:
                results["accuracy"] = accuracy.measure(folders["adapter"], work, modes, args.eval_limit, log=log)
            else:
                results["accuracy"] = {"skipped": "no trained default model on this machine yet"}
        if "profile" not in args.skip:
            import profiles

            results["profiles"] = profiles.for_misses(results, folders, log)
    results["seconds"] = time.time() - started
    if earlier is not None:
        carry_over(results, earlier, args.skip)
    out.write_text(render(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {out} ({results['seconds']:.0f} s)")
    try:
        charts.draw_all(out, out.parent, log)
    except charts.PlotUnavailable as e:
        log(f"no charts: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
