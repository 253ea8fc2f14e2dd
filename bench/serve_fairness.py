"""Is `vlmkit serve`'s scheduler fair, and as fast as static batching? (issue 19, item 7)

    python bench/serve_fairness.py                     # this checkout vs the static batcher of BASELINE_REV
    python bench/serve_fairness.py --baseline-rev REV  # another baseline (a git revision of this repository)
    python bench/serve_fairness.py --only new          # this checkout alone

Drives the server's scheduler in-process (`Batcher` + `Engine.prepare`, the path every route takes, without
HTTP) on the default model, each implementation in a fresh process. The baseline's `vlmkit/` is extracted with
`git archive` into a temporary folder (the working tree is not touched). Measured:

  (a) time to first token of a short image question on an idle server (median of a few);
  (b) the same question submitted while one ~7,500-token prompt is being prefilled (target: <= 3x (a));
  (c) 32 short image questions submitted at once (8..24 new tokens each, ignore_eos so both implementations
      generate the same tokens): completion tokens/s and requests/s (target: new >= static).

The baseline runs (b) last, with a cap (its short request waits for the whole long prompt), then its process
exits. Times come from the jobs' own timestamps (t_submit, t_first, t_end). Total time: a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE_REV = "3a6e85f"  # the last commit with the static batcher
LONG_TOKENS = 7500
QUESTIONS = [("shapes.png", "What color is the circle?"), ("count.png", "How many shapes are there?"),
             ("pie.png", "What is in this picture?"), ("chart.png", "Which bar is the tallest?")]


# --------------------------------------------------------------------------------------------- child process

def measure(impl: str, opts: dict) -> dict:
    import torch

    import vlmkit
    from vlmkit.processing.images import ImageLimits
    from vlmkit.serve.batcher import Batcher, Job
    from vlmkit.serve.engine import Engine, GenParams

    m = vlmkit.load(opts["model"])
    kwargs = {"prefill_chunk": opts["prefill_chunk"]} if impl == "new" and opts["prefill_chunk"] else {}
    batcher = Batcher(m, max_batch=8, queue_limit=64, **kwargs).start()
    engine = Engine(m, batcher, model_name="bench", limits=ImageLimits())
    images = {name: (ROOT / "examples" / name).read_bytes() for name, _ in QUESTIONS}

    def job(messages, max_tokens, **extra):
        prep = engine.prepare(messages, GenParams(max_tokens=max_tokens))
        done = threading.Event()
        j = Job(batch=prep.batch, prompt_tokens=prep.prompt_tokens, max_tokens=prep.max_tokens,
                sink=lambda e: done.set() if e[0] != "delta" else None, **extra)
        j.done_event = done
        return j

    def question(i, max_tokens=8, **extra):
        name, text = QUESTIONS[i % len(QUESTIONS)]
        return job([{"role": "user", "content": [{"type": "image", "image": images[name]},
                                                 {"type": "text", "text": text}]}], max_tokens, **extra)

    def ttft(j):
        return j.t_first - j.t_submit

    out = {"impl": impl, "torch_threads": torch.get_num_threads(), "context": m.context_length,
           "prefill_chunk": getattr(batcher, "prefill_chunk", None)}
    # (a) idle
    idle = []
    for i in range(opts["repeat"] + 1):
        j = batcher.submit(question(0))
        j.done_event.wait()
        idle.append(ttft(j))
    out["idle_ttft_s"] = statistics.median(idle[1:])  # the first one warms up
    out["idle_ttft_all_s"] = idle[1:]
    out["question_prompt_tokens"] = j.prompt_tokens
    say(impl, f"(a) idle TTFT {out['idle_ttft_s']:.3f} s")

    # (c) 32 at once
    jobs = [question(i, max_tokens=8 + (i * 5) % 17, ignore_eos=True) for i in range(32)]
    t0 = time.monotonic()
    for j in jobs:
        batcher.submit(j)
    for j in jobs:
        j.done_event.wait()
    wall = max(j.t_end for j in jobs) - t0
    out["burst_wall_s"] = wall
    out["burst_completion_tokens"] = sum(j.completion_tokens for j in jobs)
    out["burst_tokens_per_s"] = out["burst_completion_tokens"] / wall
    out["burst_requests_per_s"] = len(jobs) / wall
    out["burst_ttft_p50_s"] = statistics.median(ttft(j) for j in jobs)
    out["burst_ttft_max_s"] = max(ttft(j) for j in jobs)
    say(impl, f"(c) {out['burst_tokens_per_s']:.1f} tokens/s, {wall:.1f} s")

    # (b) one long prompt in flight
    words = " ".join(f"item{i % 97} is next to item{(i * 7) % 89}," for i in range(LONG_TOKENS // 5))
    long_msgs = [{"role": "user", "content": [{"type": "text", "text": words}]}]
    n = int(m.processor([long_msgs], max_length=10**9)["attention_mask"].sum())
    long_msgs[0]["content"][0]["text"] = words[: len(words) * (LONG_TOKENS - 20) // n] + " Which item comes first?"
    long = job(long_msgs, 8)
    out["long_prompt_tokens"] = long.prompt_tokens
    batcher.submit(long)
    while not long.t_start:
        time.sleep(0.01)
    time.sleep(opts["delay"])
    short = batcher.submit(question(0))
    finished = short.done_event.wait(opts["cap"])
    out["loaded_ttft_s"] = ttft(short) if finished and short.t_first else None
    out["loaded_cap_s"] = opts["cap"]
    say(impl, f"(b) TTFT {out['loaded_ttft_s']} s with {long.prompt_tokens} tokens in flight")
    out["long_prefill_done_before_short"] = bool(long.t_first and finished and long.t_first < short.t_first)
    return out


# --------------------------------------------------------------------------------------------- parent

def say(impl: str, text: str) -> None:
    print(f"[{impl}] {text}", file=sys.stderr, flush=True)


def run_child(impl: str, src: Path, opts: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--opts", json.dumps(opts)]
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, text=True, timeout=1200)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"the {impl} run failed (its error is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extract(rev: str, dest: Path) -> Path:
    archive = dest / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "vlmkit"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: fields[k].strip() for k in ("Model name", "CPU(s)", "Flags") if k in fields}


def table(results: list) -> str:
    def s(x, digits=2):
        return "n/a" if x is None else f"{x:.{digits}f}"

    rows = ["| | " + " | ".join(r["impl"] for r in results) + " |", "|---|" + "---|" * len(results)]
    cells = [
        ("(a) idle TTFT, s", lambda r: s(r["idle_ttft_s"], 3)),
        ("(b) TTFT with a {} -token prompt in flight, s".format(results[0]["long_prompt_tokens"]),
         lambda r: s(r["loaded_ttft_s"], 3) if r["loaded_ttft_s"] is not None else f"> {r['loaded_cap_s']:.0f}"),
        ("(b) / (a) (target <= 3)", lambda r: s(r["loaded_ttft_s"] / r["idle_ttft_s"]) if r["loaded_ttft_s"]
         else f"> {r['loaded_cap_s'] / r['idle_ttft_s']:.0f}"),
        ("(c) 32 at once: completion tokens/s", lambda r: s(r["burst_tokens_per_s"], 1)),
        ("(c) requests/s", lambda r: s(r["burst_requests_per_s"])),
        ("(c) wall, s", lambda r: s(r["burst_wall_s"], 1)),
        ("(c) TTFT p50 / max, s", lambda r: f"{s(r['burst_ttft_p50_s'])} / {s(r['burst_ttft_max_s'])}"),
        ("prefill chunk (tokens)", lambda r: str(r["prefill_chunk"] or "whole prompt")),
        ("question prompt tokens", lambda r: str(r["question_prompt_tokens"])),
    ]
    for label, f in cells:
        rows.append(f"| {label} | " + " | ".join(f(r) for r in results) + " |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision with the static batcher")
    ap.add_argument("--only", choices=["new", "old"], default=None)
    ap.add_argument("--prefill-chunk", type=int, default=None, help="new scheduler's chunk (default: by device)")
    ap.add_argument("--repeat", type=int, default=3, help="idle TTFT samples")
    ap.add_argument("--delay", type=float, default=2.0, help="seconds into the long prefill the question comes")
    ap.add_argument("--cap", type=float, default=60.0, help="longest wait for (b) (the static batcher)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--opts", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = measure(args.child, json.loads(args.opts))
        print(json.dumps(result), flush=True)
        os._exit(0)  # the static batcher may still be prefilling the long prompt: do not wait for it
    opts = {"model": args.model, "prefill_chunk": args.prefill_chunk, "repeat": args.repeat, "delay": args.delay,
            "cap": args.cap}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "new"):
            results.append(run_child("new", ROOT, opts))
        if args.only in (None, "old"):
            src = extract(args.baseline_rev, Path(tmp))
            old = run_child("old", src, opts)
            old["impl"] = f"static ({args.baseline_rev})"
            results.append(old)
    print(table(results))
    cpu = lscpu()
    print(f"\nCPU: {cpu.get('Model name', '?')}, {cpu.get('CPU(s)', '?')} CPUs, torch threads "
          f"{results[0]['torch_threads']}; load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print(f"flags: {cpu.get('Flags', '?')}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
