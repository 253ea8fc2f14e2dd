"""Structured output's cost per token on the default model: decode tokens/s unconstrained vs `json_schema=True`
(any JSON object, OpenAI's json_object) vs a nested schema, at batch 1 and 8, and the constraint's own work per
decode step (llguidance's mask computation, turning the bitmask into a logits mask, the matchers taking the
chosen tokens), timed inside the generation loop.

    python bench/structured.py [--tokens 64] [--repeat 3] [--dtype float32] [--threads N]

Prints a Markdown table (the machine first). Decode tokens/s = the rows' new tokens after the first step / (time of
the last step - time of the first): prefill excluded, as bench/decode.py counts it; answers end at eos, so modes
differ in length and, in a batch, in how many rows are still live. The comparable number is the decode step time
(median step; finished rows stay in the batch until all are done): a constrained step is an unconstrained one plus
the constraint's work. Best (lowest median step) of --repeat runs."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import llguidance.numpy as llg_numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import vlmkit  # noqa: E402
from vlmkit.benchmark import machine  # noqa: E402
from vlmkit.generation import constraints  # noqa: E402
from vlmkit.generation.constraints import Constraint  # noqa: E402
from vlmkit.generation.loop import GenerationConfig, generate_tokens  # noqa: E402

PROMPTS = [
    "Describe a person you admire as JSON.", "Give a city, its country and population as JSON.",
    "List three fruits and their colors as JSON.", "Describe a car as JSON.", "Describe your favorite book as JSON.",
    "Give the weather for tomorrow as JSON.", "Describe a dog as JSON.", "Give a recipe as JSON.",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "kind": {"enum": ["person", "place", "thing"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "details": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                     "active": {"type": "boolean"}},
                    "required": ["city", "active"], "additionalProperties": False},
    },
    "required": ["name", "age", "score", "kind", "tags", "details"],
    "additionalProperties": False,
}
MODES = {"unconstrained": None, "json_object": Constraint("json_schema", True),
         "schema": Constraint("json_schema", SCHEMA)}

TIMES: dict = defaultdict(float)  # seconds spent in each part of the constraint during one run


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t
    return wrapper


def instrument() -> None:
    """Time the constraint's parts where the loop calls them: llguidance's mask fill, the whole mask rule (fill +
    bitmask -> logits), the matchers' token step."""
    llg_numpy.fill_next_token_bitmask = timed("fill", llg_numpy.fill_next_token_bitmask)
    llg_numpy.fill_next_token_bitmask_par = timed("fill", llg_numpy.fill_next_token_bitmask_par)
    constraints.GrammarRows.mask = timed("mask", constraints.GrammarRows.mask)
    constraints.GrammarRows.advance = timed("advance", constraints.GrammarRows.advance)


def run(m, rows: int, constraint, tokens: int) -> dict:
    tok, eos = m.processor.tokenizer, list(m.processor.eos_token_ids)
    prompts = [m._prompt(p, None) for p in (PROMPTS * 2)[:rows]]
    batch = m.processor(prompts, None)
    compiled = None if constraint is None else constraint.compile(tok, eos)
    cfg = GenerationConfig(max_new_tokens=tokens, eos_token_ids=eos, pad_token_id=tok.pad_token_id,
                           constraint=compiled)
    TIMES.clear()
    stamps, live = [], []
    alive = torch.ones(rows, dtype=torch.bool)
    with torch.inference_mode():
        for step in generate_tokens(m.model, batch, cfg):
            stamps.append(time.perf_counter())
            live.append(int(alive.sum()))
            alive &= ~torch.isin(step.cpu(), torch.tensor(eos))
    steps = len(stamps)
    decode_s = stamps[-1] - stamps[0] if steps > 1 else float("nan")
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:])) or [float("nan")]
    return {"steps": steps, "tokens": sum(live), "tok_s": sum(live[1:]) / decode_s,
            "step_ms": 1e3 * gaps[len(gaps) // 2], **{k: 1e6 * v / steps for k, v in TIMES.items()}}


def best_of(m, rows, constraint, tokens, repeat) -> dict:
    results = [run(m, rows, constraint, tokens) for _ in range(repeat)]
    return min(results, key=lambda r: r["step_ms"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default: vlmkit's choice for this machine")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    instrument()
    m = vlmkit.load("default", dtype=args.dtype)
    run(m, 1, MODES["schema"], 4)  # warm-up: llguidance's tokenizer, first-call allocations
    info = machine()
    print(f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; CPU flags: {info['flags']}; "
          f"torch {info['torch']} ({info['torch_threads']} threads), default model in "
          f"{next(m.model.parameters()).dtype}, greedy, up to {args.tokens} new tokens, best of {args.repeat}.\n")
    print("| mode | batch | tokens | decode tok/s | decode step ms (median) | step vs unconstrained "
          "| llguidance mask us/step | mask -> logits us/step | matchers advance us/step "
          "| constraint share of a step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in [int(x) for x in args.batches.split(",")]:
        base = None
        for name, constraint in MODES.items():
            r = best_of(m, rows, constraint, args.tokens, args.repeat)
            base = base or r["step_ms"]
            if constraint is None:
                cells = ["-", "-", "-", "-"]
            else:
                own = r.get("mask", 0) + r.get("advance", 0)
                cells = [f"{r.get('fill', 0):.0f}", f"{r.get('mask', 0) - r.get('fill', 0):.0f}",
                         f"{r.get('advance', 0):.0f}", f"{own / (10 * r['step_ms']):.1f}%"]
            print(f"| {name} | {rows} | {r['tokens']} | {r['tok_s']:.1f} | {r['step_ms']:.1f} | "
                  f"{r['step_ms'] / base:.2f}x | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
