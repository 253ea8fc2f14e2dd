"""Real-size checks (issue 21): a LLaVA-1.5-shaped checkpoint built by transformers (random weights, no download),
peak anonymous memory of loading it with vlmkit (each row a fresh child process), and the per-part memory
accounting of LLaVA-1.5-7B computed from its config.

    python -m bench.scale --size small --workdir /tmp/scale          # reduced shape (~0.5B decoder): quick check
    python -m bench.scale --size full --workdir /tmp/scale --repeat 3  # the issue's 1.07B decoder (~9 GB peak fp32)
    python -m bench.scale --accounting                               # LLaVA-1.5-7B by parts, nothing built
    ... --skip hf-bf16,bf16 --new-tokens 6 --speed-only              # fewer rows / tokens on a slow or busy box

The speed table (load, peak RSS and anonymous RSS, TTFT, decode tok/s at batch 1 and 8, the rooflines) is printed
and written as Markdown to WORKDIR/speed-SIZE.md (`render_markdown`), row by row as they finish.

Rows: vlmkit int8 / int4 quantized at load, int4 from a folder saved int4 (written once by `vlmkit quantize`),
bf16 as stored. Peak RSS: VmHWM (counts the memory-mapped checkpoint pages read); peak anon: RssAnon polled every
5 ms during the load (/proc has no high-water mark of anonymous memory alone); both less the process after imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from vlmkit import benchmark
from vlmkit.hardware import kernel_flags
from vlmkit.models.quant import memory_bytes

# CLIP ViT-L/14 at 336 px: 576 image tokens, as LLaVA-1.5.
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, projection_dim=768)
SHAPES = {
    # the checkpoint: a 1.07B Llama decoder (1.48B parameters with the vision tower)
    "full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32064),
    # ~0.5B decoder: what a shared 2-core box measures without holding over ~5 GB
    "small": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32064),
}
# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf config.json): Vicuna-7B decoder
LLAVA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32064)


def build_checkpoint(folder: Path, size: str) -> Path:
    """The LLaVA-1.5-shaped checkpoint (bf16 safetensors), built once and reused."""
    if (folder / "config.json").is_file():
        return folder
    import transformers as tf

    text = tf.LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, **SHAPES[size])
    cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**VISION), text_config=text, image_token_index=32000,
                         image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="20GB")
    tmp.rename(folder)
    return folder


# ------------------------------------------------------------------------------------------------ memory

def status_kb(field: str) -> int:
    return benchmark.proc_status_kb(field) or 0


def probe_load(folder: str, mode: str) -> dict:
    """In this (fresh) process: load, then report peak RSS, anonymous RSS after the load and the model's bytes."""
    from vlmkit.api import QUANTIZE_VISION
    from vlmkit.checkpoints.hf import load_model
    from vlmkit.checkpoints.quantized import load_quantized

    base_anon, base_hwm = status_kb("RssAnon"), status_kb("VmHWM")
    peak_anon, done = [base_anon], threading.Event()

    def sample():  # /proc has no peak of anonymous memory alone: poll it (torch's kernels release the GIL)
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], status_kb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    if mode in ("int8", "int4", "saved"):
        model = load_quantized(folder, None if mode == "saved" else mode, vision=QUANTIZE_VISION)
    else:
        model = load_model(folder)
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    return {"load_s": seconds, "peak_gb": status_kb("VmHWM") / 2**20, "base_gb": base_hwm / 2**20,
            "peak_anon_gb": (max(peak_anon[0], status_kb("RssAnon")) - base_anon) / 2**20,
            "anon_after_gb": (status_kb("RssAnon") - base_anon) / 2**20, "model_gb": memory_bytes(model) / 2**30}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.scale", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    if out.returncode:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(folder: Path, saved: Path, repeat: int) -> list[dict]:
    rows = []
    for label, path, mode in (("vlmkit bf16 (as stored)", folder, "float"), ("vlmkit int8 at load", folder, "int8"),
                              ("vlmkit int4 at load", folder, "int4"), ("vlmkit int4 from saved folder", saved, "saved")):
        runs = [run_child(["--probe", str(path), mode]) for _ in range(repeat)]
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row["label"] = label
        rows.append(row)
    print("| | load s | peak RSS GB | peak - imports GB | peak anon GB | anon after GB | model GB | "
          "(peak - imports) / model | peak anon / model |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        over = r["peak_gb"] - r["base_gb"]
        print(f"| {r['label']} | {r['load_s']:.1f} | {r['peak_gb']:.2f} | {over:.2f} | {r['peak_anon_gb']:.2f} | "
              f"{r['anon_after_gb']:.2f} | {r['model_gb']:.2f} | {over / r['model_gb']:.2f}x | "
              f"{r['peak_anon_gb'] / r['model_gb']:.2f}x |")
    return rows


# ------------------------------------------------------------------------------------------------ speed

PROMPT_TEXT = 22  # text tokens around the 576 image tokens: a 598-token prompt, as the table
NEW_TOKENS = 16
BATCH = 8  # decode at batch 8 runs after a short text prompt: 8 image prompts would spend minutes in prefill
BATCH_PROMPT = 32
# key -> (label, implementation, mode). Modes: a float dtype; int8 / int4 quantized at load (the float parts in the
# compute dtype this CPU calls for); "saved": the int4 folder; "+packed": the int8 layers on fbgemm's packed weights
# (quant_packed.pack_model); "+vision8": the vision tower's linears too, int8 packed.
ROWS = {
    "hf-fp32": ("transformers fp32", "transformers", "float32"),
    "fp32": ("vlmkit fp32", "vlmkit", "float32"),
    "hf-bf16": ("transformers bf16", "transformers", "bfloat16"),
    "bf16": ("vlmkit bf16", "vlmkit", "bfloat16"),
    "int8": ("vlmkit int8", "vlmkit", "int8"),
    "int4": ("vlmkit int4", "vlmkit", "int4"),
    "saved": ("vlmkit int4 from a saved int4 folder", "vlmkit", "saved"),
    "int8-packed": ("vlmkit int8, packed (int8 GEMM)", "vlmkit", "int8+packed"),
    "int8-vision": ("vlmkit int8 + vision int8 packed", "vlmkit", "int8+vision8"),
    "int8-packed-vision": ("vlmkit int8, packed + vision int8", "vlmkit", "int8+packed+vision8"),
    "int4-vision": ("vlmkit int4 + vision int8 packed", "vlmkit", "int4+vision8"),
}


def _inputs(cfg_vocab: int, image_token: int):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, min(cfg_vocab, 32000), (PROMPT_TEXT,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((576,), image_token), text])[None]
    pixels = torch.randn(1, 3, 336, 336, generator=g)
    batch_ids = torch.randint(3, min(cfg_vocab, 32000), (BATCH, BATCH_PROMPT), generator=g)
    return ids, pixels, batch_ids


class AnonPeak:
    """Peak anonymous RSS over a `with` block, less the level at its start (/proc has no such high-water mark:
    polled every 5 ms; torch's kernels release the GIL)."""

    def __enter__(self):
        self.base = self.peak = status_kb("RssAnon")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, status_kb("RssAnon"))

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.gb = (max(self.peak, status_kb("RssAnon")) - self.base) / 2**20


def _hf_generate(model, **inputs) -> tuple[float, float]:
    """(time to first token, decode tok/s over all rows) of one transformers greedy generate call."""

    class Clock:  # put() gets the prompt, then each new token (all rows at once) as it is chosen
        stamps = []

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    clock, t = Clock(), time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, streamer=clock, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       do_sample=False)
    first, last = clock.stamps[1], clock.stamps[-1]
    rows = inputs["input_ids"].shape[0]
    return first - t, rows * (len(clock.stamps) - 2) / (last - first)


def _load_vlmkit(folder: str, mode: str):
    from vlmkit.api import QUANTIZE_VISION
    from vlmkit.checkpoints.hf import load_model
    from vlmkit.checkpoints.quantized import load_quantized
    from vlmkit.hardware import compute_dtype
    from vlmkit.models.quant_packed import pack_model

    base, *extra = mode.split("+")
    if base in ("float32", "bfloat16"):
        return load_model(folder, dtype=getattr(torch, base))
    # the float parts (vision tower, norms, activations) in the dtype this CPU computes fastest in
    model = load_quantized(folder, None if base == "saved" else base, dtype=compute_dtype("cpu"),
                           vision=QUANTIZE_VISION)
    if extra:
        pack_model(model, vision="vision8" in extra, decoder="packed" in extra)
    return model


def probe_speed(folder: str, impl: str, mode: str) -> dict:
    """In this (fresh) process: load (time, peak RSS and anonymous RSS), time to first token of the image +
    598-token prompt and decode tok/s after it (batch 1), decode tok/s of 8 short text prompts (batch 8)."""
    base = status_kb("VmHWM")
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        if impl == "transformers":
            import transformers as tf

            model = tf.LlavaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, mode)).eval()
        else:
            model = _load_vlmkit(folder, mode)
        load_s = time.perf_counter() - t0
    out = {"load_s": load_s, "peak_gb": (status_kb("VmHWM") - base) / 2**20, "peak_anon_gb": anon.gb}
    if impl == "transformers":
        ids, pixels, batch_ids = _inputs(model.config.text_config.vocab_size, model.config.image_token_index)
        out["ttft_s"], out["tok_s"] = _hf_generate(model, input_ids=ids, attention_mask=torch.ones_like(ids),
                                                   pixel_values=pixels.to(model.dtype))
        _, out["tok_s_8"] = _hf_generate(model, input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids))
        lm = [p for n, p in model.named_parameters() if "vision_tower" not in n and "multi_modal_projector" not in n]
        out["decode_gb"] = sum(p.numel() * p.element_size() for p in lm) / 2**30
        return out
    ids, pixels, batch_ids = _inputs(model.cfg.text.vocab_size, model.cfg.image_token_id)
    with torch.no_grad():
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels.to(model.dtype)}
        out["ttft_s"], out["tok_s"] = benchmark.time_tokens(model, batch, NEW_TOKENS)
        batch = {"input_ids": batch_ids, "attention_mask": torch.ones_like(batch_ids)}
        _, out["tok_s_8"] = benchmark.time_tokens(model, batch, NEW_TOKENS)
    out["model_gb"], out["decode_gb"] = memory_bytes(model) / 2**30, decode_bytes(model) / 2**30
    return out


def decode_bytes(model) -> int:
    """Weights read per decoded token: the decoder and head (the vision tower runs once, at prefill)."""
    return memory_bytes(model.text) if hasattr(model, "text") else memory_bytes(model)


def machine() -> dict:
    """Measured here: read bandwidth and fp32 GEMM peak (the rooflines); the CPU's kernel flags."""
    return {"read_gbs": benchmark.read_bandwidth(), "gemm_gflops": benchmark.gemm_peak(), "flags": kernel_flags(),
            "threads": torch.get_num_threads()}


def prefill_flops(size: str) -> float:
    """2 x parameters x tokens: the decoder over the prompt, the vision tower over 577 patches (+ projector)."""
    t, v = SHAPES[size], VISION
    h, kv = t["hidden_size"], t["hidden_size"] // t["num_attention_heads"] * t["num_key_value_heads"]
    dec = t["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * t["intermediate_size"]) + t["vocab_size"] * h
    vis = v["num_hidden_layers"] * (4 * v["hidden_size"] ** 2 + 2 * v["hidden_size"] * v["intermediate_size"])
    return 2 * (dec * (577 + PROMPT_TEXT) + vis * 577 + (v["hidden_size"] * h + h * h) * 576)


def render_markdown(m: dict, rows: list[dict], size: str, repeat: int) -> str:
    """The speed table as Markdown (for bench/results.md): medians of `repeat` fresh processes per row."""
    floor = prefill_flops(size) / (m["gemm_gflops"] * 1e9)
    base = next((r for r in rows if r["key"] in ("hf-fp32", "fp32")), None)  # transformers fp32, else vlmkit's
    ref = base and base["ttft_s"]
    lines = [f"LLaVA-1.5-shaped checkpoint, size `{size}` (CLIP ViT-L/336 + {SHAPES[size]['num_hidden_layers']}-layer "
             f"Llama decoder, hidden {SHAPES[size]['hidden_size']}), prompt {577 + PROMPT_TEXT} tokens, "
             f"{NEW_TOKENS} new tokens; medians of {repeat} fresh process(es) per row.",
             f"CPU flags: {m['flags']}; {m['threads']} threads; measured read bandwidth {m['read_gbs']:.1f} GB/s, "
             f"fp32 GEMM {m['gemm_gflops']:.0f} GFLOP/s; prefill floor (FLOPs / GEMM peak) {floor:.1f} s.", "",
             f"| | load s | peak load RSS GB (anon) | TTFT s | TTFT / {base['label'] if base else '-'} | decode tok/s b=1 | "
             f"decode tok/s b={BATCH} | decode GB/token | decode limit tok/s (bandwidth / bytes) | b=1 % of limit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        limit = m["read_gbs"] / (r["decode_gb"] * 2**30 / 1e9)
        ratio = f"{r['ttft_s'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {r['label']} | {r['load_s']:.1f} | {r['peak_gb']:.2f} ({r['peak_anon_gb']:.2f}) | "
                     f"{r['ttft_s']:.1f} | {ratio} | {r['tok_s']:.2f} | {r['tok_s_8']:.1f} | {r['decode_gb']:.2f} | "
                     f"{limit:.1f} | {r['tok_s'] / limit * 100:.0f}% |")
    return "\n".join(lines)


def speed_table(folder: Path, saved: Path, size: str, repeat: int, keys: list[str], progress=None) -> str:
    m = run_child(["--machine"])
    rows = []
    for key in keys:
        label, impl, mode = ROWS[key]
        path = saved if mode == "saved" else folder
        try:
            runs = [run_child(["--speed", str(path), impl, mode, "--new-tokens", str(NEW_TOKENS)])
                    for _ in range(repeat)]
        except RuntimeError as e:  # one row's failure (memory, a missing backend) must not lose the others
            print(f"  {label}: FAILED {e}", file=sys.stderr, flush=True)
            continue
        rows.append({"key": key, "label": label, **{k: statistics.median(x[k] for x in runs) for k in runs[0]}})
        print(f"  {label}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        if progress is not None:  # the table so far: a long run interrupted still leaves its rows
            progress.write_text(render_markdown(m, rows, size, repeat) + "\n")
    return render_markdown(m, rows, size, repeat)


# ------------------------------------------------------------------------------------------------ accounting

def accounting(ratio_at_load: float, ratio_saved: float, group: int = 32) -> None:
    """LLaVA-1.5-7B by parts, from its config: what an int4 load holds, and its peak by the measured ratios."""
    v, t = VISION, LLAVA7B
    gb = 2**30
    vis = v["num_hidden_layers"] * (4 * v["hidden_size"] ** 2 + 2 * v["hidden_size"] * v["intermediate_size"]) \
        + (v["image_size"] // v["patch_size"]) ** 2 * v["hidden_size"] + 3 * 14 * 14 * v["hidden_size"]
    proj = v["hidden_size"] * t["hidden_size"] + t["hidden_size"] ** 2
    h, kv = t["hidden_size"], t["hidden_size"] // t["num_attention_heads"] * t["num_key_value_heads"]
    dec = t["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * t["intermediate_size"])
    emb = t["vocab_size"] * h
    parts = {
        "vision tower (bf16)": vis * 2,
        "projector (bf16)": proj * 2,
        "decoder int4 (+ bf16 scale and zero per 32)": dec * (0.5 + 4 / group),
        "embeddings int8 (+ row scales)": emb + t["vocab_size"] * 2,
        "lm head int8 (+ row scales)": emb + t["vocab_size"] * 2,
    }
    model = sum(parts.values())
    print("\nLLaVA-1.5-7B int4, by parts (computed from its config; vision tower and projector as stored, bf16):")
    print("| part | GB |\n|---|---:|")
    for name, b in parts.items():
        print(f"| {name} | {b / gb:.2f} |")
    print(f"| **model** | **{model / gb:.2f}** |")
    caches = {}
    for tokens in (2048, 4096):
        for dtype, size in (("bf16", 2), ("fp32", 4)):
            caches[tokens, dtype] = 2 * t["num_hidden_layers"] * kv * tokens * size  # keys and values
            print(f"| KV cache {dtype}, {tokens} tokens | {caches[tokens, dtype] / gb:.2f} |")
    print("\n| load | load peak (ratio x model) | GB | + running, 2k bf16 cache | fits 8 GB |")
    print("|---|---:|---:|---:|---|")
    for how, ratio in (("quantized at load", ratio_at_load), ("from a saved int4 folder", ratio_saved)):
        peak, running = model * ratio, model + caches[2048, "bf16"]
        worst = max(peak, running)
        print(f"| {how} | {ratio:.2f}x | {peak / gb:.2f} | {running / gb:.2f} | "
              f"{'yes' if worst < 8 * gb else 'no'} ({worst / gb:.2f} GB) |")


def main(argv=None) -> None:
    global NEW_TOKENS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SHAPES), default="small")
    p.add_argument("--workdir", default="/tmp/vlmkit-scale")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--accounting", action="store_true", help="only the LLaVA-1.5-7B accounting (default ratios)")
    p.add_argument("--memory-only", action="store_true", help="only the load-memory table and the accounting")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens decoded per row (>= 2)")
    p.add_argument("--speed-only", action="store_true", help="only the speed table")
    p.add_argument("--skip", default="", help=f"comma-separated speed rows to leave out, of: {', '.join(ROWS)} "
                   "(bf16 rows take minutes where the CPU has no bf16 units)")
    p.add_argument("--probe", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--speed", nargs=3, metavar=("FOLDER", "IMPL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--machine", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed is timed from the second token)")
    NEW_TOKENS = a.new_tokens
    skip = [k for k in a.skip.split(",") if k]
    if unknown := sorted(set(skip) - set(ROWS)):
        p.error(f"--skip: unknown rows {unknown}; known: {', '.join(ROWS)}")
    if a.probe:
        print(json.dumps(probe_load(*a.probe)))
        return
    if a.speed:
        print(json.dumps(probe_speed(*a.speed)))
        return
    if a.machine:
        print(json.dumps(machine()))
        return
    if a.accounting:
        accounting(1.3, 1.2)
        return
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    folder = build_checkpoint(work / f"llava-{a.size}", a.size)
    saved = work / f"llava-{a.size}-int4"
    if not (saved / "config.json").is_file():
        from vlmkit.checkpoints.quantized import load_quantized, save_quantized
        save_quantized(load_quantized(folder, "int4"), saved)
    if a.speed_only and a.memory_only:
        p.error("--speed-only and --memory-only exclude each other")
    if not a.memory_only:
        out = work / f"speed-{a.size}.md"
        table = speed_table(folder, saved, a.size, a.repeat, [k for k in ROWS if k not in skip], out)
        out.write_text(table + "\n")
        print(table + "\n", flush=True)
    if a.speed_only:
        return
    rows = memory_table(folder, saved, a.repeat)
    # anonymous memory is what must fit: the checkpoint's mapped pages are clean page cache the kernel can drop
    ratio = {r["label"]: r["peak_anon_gb"] / r["model_gb"] for r in rows}
    accounting(ratio["vlmkit int4 at load"], ratio["vlmkit int4 from saved folder"])


if __name__ == "__main__":
    main()
