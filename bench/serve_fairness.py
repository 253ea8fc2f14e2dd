"""Is `vlmkit serve`'s scheduler fair, and as fast as static batching? (issue 19, item 7)

    python bench/serve_fairness.py                     # this checkout vs the static batcher of BASELINE_REV
    python bench/serve_fairness.py --baseline-rev REV  # another baseline (a git revision of this repository)
    python bench/serve_fairness.py --only new          # this checkout alone

Drives the server's scheduler in-process (`Batcher` + `Engine.prepare`, the path every route takes, without
HTTP) on the default model, each implementation in its own process, the model loaded once; the implementations
take turns (`--rounds`), since a shared machine's load drifts. The baseline's `vlmkit/` is extracted with
`git archive` into a temporary folder (the working tree is not touched). Measured:

  (a) time to first token of a short image question on an idle server (median of a few);
  (b) the same question submitted while one ~7,500-token prompt is being prefilled (target: <= 3x (a));
  (c) 32 short image questions submitted at once (4..12 new tokens each, ignore_eos so both implementations
      generate the same tokens): completion tokens/s and requests/s (target: new >= static).

(b) runs last, once, with a cap (the static batcher's short request waits for the whole long prompt); then the
processes are ended. Times come from the jobs' own timestamps (t_submit, t_first, t_end). Total time: a few minutes.
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

def serve_commands(impl: str, opts: dict) -> None:
    """Load the model once, then answer the parent's commands (one per stdin line: a, c, b) with a JSON line."""
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

    def idle():  # (a)
        j = batcher.submit(question(0))
        j.done_event.wait()
        return {"ttft": ttft(j), "prompt_tokens": j.prompt_tokens}

    def burst():  # (c)
        jobs = [question(i, max_tokens=4 + (i * 3) % 9, ignore_eos=True) for i in range(32)]
        t0 = time.monotonic()
        for j in jobs:
            batcher.submit(j)
        for j in jobs:
            j.done_event.wait()
        wall = max(j.t_end for j in jobs) - t0
        return {"wall": wall, "tokens": sum(j.completion_tokens for j in jobs), "requests": len(jobs),
                "ttft_p50": statistics.median(ttft(j) for j in jobs), "ttft_max": max(ttft(j) for j in jobs)}

    def loaded():  # (b): one long prompt in flight
        words = " ".join(f"item{i % 97} is next to item{(i * 7) % 89}," for i in range(LONG_TOKENS // 5))
        msgs = [{"role": "user", "content": [{"type": "text", "text": words}]}]
        n = int(m.processor([msgs], max_length=10**9)["attention_mask"].sum())
        msgs[0]["content"][0]["text"] = words[: len(words) * (LONG_TOKENS - 20) // n] + " Which item comes first?"
        long = batcher.submit(job(msgs, 8))
        while not long.t_start:
            time.sleep(0.01)
        time.sleep(opts["delay"])
        short = batcher.submit(question(0))
        finished = short.done_event.wait(opts["cap"])
        return {"ttft": ttft(short) if finished and short.t_first else None, "long_tokens": long.prompt_tokens}

    print(json.dumps({"torch_threads": torch.get_num_threads(), "prefill_chunk": getattr(batcher, "prefill_chunk",
                                                                                          None)}), flush=True)
    for line in sys.stdin:
        result = {"a": idle, "b": loaded, "c": burst}[line.strip()]()
        print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------- parent

def say(impl: str, text: str) -> None:
    print(f"[{impl}] {text}", file=sys.stderr, flush=True)


class Child:
    """One implementation in its own process, model loaded once, measuring on command."""

    def __init__(self, impl: str, src: Path, opts: dict):
        self.impl = impl
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--opts", json.dumps(opts)]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(src)}, cwd=str(ROOT),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.impl} process failed (its error is above)")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        result = self._read()
        say(self.impl, f"{command}: {result}")
        return result

    def close(self) -> None:
        self.proc.kill()  # the static batcher may still be prefilling the long prompt: do not wait for it
        self.proc.wait()


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


def summarise(impl: str, info: dict, rounds: list, loaded: dict, cap: float) -> dict:
    idle = [x["ttft"] for r in rounds for x in r["a"]]
    bursts = [r["c"] for r in rounds]
    return {"impl": impl, **info, "idle_ttft_s": statistics.median(idle), "idle_ttft_all_s": idle,
            "question_prompt_tokens": rounds[0]["a"][0]["prompt_tokens"],
            "burst_tokens_per_s": statistics.median(b["tokens"] / b["wall"] for b in bursts),
            "burst_requests_per_s": statistics.median(b["requests"] / b["wall"] for b in bursts),
            "burst_walls_s": [b["wall"] for b in bursts], "burst_completion_tokens": bursts[0]["tokens"],
            "burst_ttft_p50_s": statistics.median(b["ttft_p50"] for b in bursts),
            "burst_ttft_max_s": max(b["ttft_max"] for b in bursts),
            "loaded_ttft_s": loaded["ttft"], "loaded_cap_s": cap, "long_prompt_tokens": loaded["long_tokens"]}


def table(results: list) -> str:
    def s(x, digits=2):
        return "n/a" if x is None else f"{x:.{digits}f}"

    rows = ["| | " + " | ".join(r["impl"] for r in results) + " |", "|---|" + "---|" * len(results)]
    cells = [
        ("(a) idle TTFT, s (median)", lambda r: s(r["idle_ttft_s"], 3)),
        ("(b) TTFT with a {}-token prompt in flight, s".format(results[0]["long_prompt_tokens"]),
         lambda r: s(r["loaded_ttft_s"], 3) if r["loaded_ttft_s"] is not None else f"> {r['loaded_cap_s']:.0f}"),
        ("(b) / (a) (target <= 3)", lambda r: s(r["loaded_ttft_s"] / r["idle_ttft_s"]) if r["loaded_ttft_s"]
         else f"> {r['loaded_cap_s'] / r['idle_ttft_s']:.0f}"),
        ("(c) 32 at once: completion tokens/s (median)", lambda r: s(r["burst_tokens_per_s"], 1)),
        ("(c) requests/s (median)", lambda r: s(r["burst_requests_per_s"])),
        ("(c) wall per burst, s", lambda r: ", ".join(s(w, 1) for w in r["burst_walls_s"])),
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
    ap.add_argument("--repeat", type=int, default=3, help="idle TTFT samples per round")
    ap.add_argument("--rounds", type=int, default=2, help="turns of (a) and (c) per implementation")
    ap.add_argument("--delay", type=float, default=2.0, help="seconds into the long prefill the question comes")
    ap.add_argument("--cap", type=float, default=60.0, help="longest wait for (b) (the static batcher)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--opts", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        serve_commands(args.child, json.loads(args.opts))
        return 0
    opts = {"model": args.model, "prefill_chunk": args.prefill_chunk, "delay": args.delay, "cap": args.cap}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        if args.only in (None, "new"):
            children.append(Child("new", ROOT, opts))
        if args.only in (None, "old"):
            children.append(Child(f"static ({args.baseline_rev})", extract(args.baseline_rev, Path(tmp)), opts))
        try:
            for c in children:
                c.ask("a")  # warm-up
            rounds = {c.impl: [] for c in children}
            for _ in range(args.rounds):  # the implementations take turns: the box's load drifts
                for c in children:
                    rounds[c.impl].append({"a": [c.ask("a") for _ in range(args.repeat)], "c": c.ask("c")})
            results = [summarise(c.impl, c.info, rounds[c.impl], c.ask("b"), args.cap) for c in children]
        finally:
            for c in children:
                c.close()
    print(table(results))
    cpu = lscpu()
    print(f"\nCPU: {cpu.get('Model name', '?')}, {cpu.get('CPU(s)', '?')} CPUs, torch threads "
          f"{results[0]['torch_threads']}; load average (1 min) before / after: {load_before:.1f} / "
          f"{os.getloadavg()[0]:.1f}")
    print(f"flags: {cpu.get('Flags', '?')}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
