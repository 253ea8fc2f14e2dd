"""One command for a GPU (issue 21, point 7): `python -m bench.gpu --out bench/gpu_results.md` (under 5 minutes).

1. The device's read bandwidth, measured here (a reduction over a tensor far past the caches): the decode limit.
2. The correctness checks of the quantized layers on this device (vlmkit/models/quant_cuda.py): torch's int4 packing
   op against our tensor-operation copy of it, the int4 / int8 kernels and the dequantizing fallback against the
   float result, a module moved CPU -> device -> CPU, QLoRA's backward. A failed check makes the exit status 1.
3. One layer (11008 x 4096) through each path at 1, 32 and a prefill's rows: where the kernels stop paying.
4. LLaVA-1.5-7B- and Idefics2-8B-shaped random models built by transformers directly on the device (bf16), rows
   transformers bf16 / vlmkit bf16 / int8 / int4: time to first token with an image, decode tok/s at batch 1 and 32,
   and decode's share of the bandwidth limit (bytes of weights read per token x tok/s / measured bandwidth).

`--tiny --device cpu` runs the same code on tiny shapes in seconds (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import fmt
from bench.scale import LLAVA7B, VISION
from vlmkit import benchmark
from vlmkit.checkpoints.builder import TensorSource, build_model
from vlmkit.checkpoints.families import family_for_architecture
from vlmkit.checkpoints.keymaps import build_key_map, normalize_names
from vlmkit.models import quant_cuda
from vlmkit.models.quant import (Int4Linear, Int8Linear, QuantSpec, memory_bytes, quantize_int4,
                                 train_through_quantized)

# Idefics2-8B (HuggingFaceM4/idefics2-8b config.json): SigLIP-so400m at 980 px, perceiver 64 x 3, Mistral-7B.
IDEFICS2_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=980, patch_size=14)
IDEFICS2_PERCEIVER = dict(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96,
                          num_key_value_heads=4)
MISTRAL7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32003)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=14)
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
TINY_PERCEIVER = dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16,
                      num_key_value_heads=1)
PROMPT_TEXT = 24  # text tokens after the image
TOL = 2e-2  # max |y - float reference| / max |reference|: bf16 activations and outputs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device, repeat: int = 3) -> float:
    return benchmark.timed(lambda: (fn(), sync(device)), repeat=repeat)


def read_bandwidth(device: torch.device, gib: float) -> float:
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    return x.numel() * 4 / seconds(x.sum, device, repeat=5) / 1e9


# ------------------------------------------------------------------------------------------------ checks

def why(e: Exception) -> str:
    """An error as one table cell: a failed piece is reported and the run goes on (one GPU run must say it all)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}".replace("|", "/")


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def checks(device: torch.device, shapes: list) -> list[tuple[str, bool, str]]:
    """(what, passed, detail) for each check of the quantized layers on `device`."""
    out = []

    def check(name, ok, detail=""):
        out.append((name, bool(ok), detail))

    g = torch.Generator().manual_seed(0)
    for n, k in shapes:
        try:
            _shape_checks(check, device, g, n, k)
        except Exception as e:  # noqa: BLE001 -- reported as a failed check
            check(f"checks of a {n}x{k} layer ran to the end", False, why(e))
    return out


def _shape_checks(check, device: torch.device, g: torch.Generator, n: int, k: int) -> None:
    tag = f"{n}x{k}"
    w = torch.randn(n, k, generator=g).to(device)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8).to(device)
    if device.type == "cuda" and quant_cuda.has_kernel("_convert_weight_to_int4pack", "CUDA"):
        for t in quant_cuda.INNER_K_TILES:
            if k % (16 * t) == 0:
                real = torch.ops.aten._convert_weight_to_int4pack(quant_cuda.kernel_bytes(q), t)
                check(f"int4 packing op == reference, inner k-tiles {t}", torch.equal(
                    real, quant_cuda.pack_tinygemm(q, t)), tag)
                check(f"int4 unpack(op's packing) == values, inner k-tiles {t}", torch.equal(
                    quant_cuda.unpack_tinygemm(real, n, k), q), tag)
    m4 = Int4Linear.from_float(w, group_size=32)
    m8 = Int8Linear.from_float(w)
    ampere = device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)
    expected = "cpu" if device.type == "cpu" else "cuda" if ampere else "plain"  # not cuda_int4_kernel's own answer
    check("int4 layer packed for the device's kernel", m4.layout == expected, f"{tag}: {m4.layout}")
    if device.type == "cuda":
        check("torch has the CUDA int8 kernel", quant_cuda.has_kernel("_weight_int8pack_mm", "CUDA"))
    for rows in (1, 32, 600):
        x = torch.randn(rows, k, generator=g).to(device, torch.bfloat16)
        for kind, m in (("int4", m4), ("int8", m8)):
            e = _err(m(x), x.float() @ m.dequantize().float().t())
            check(f"{kind} layer == float reference, {rows} rows", e < TOL, f"{tag}: rel err {e:.1e}")
    # Moved CPU -> device -> CPU: repacked for each device, the same values, the CPU layout back bit for bit.
    values, scales, mins = quantize_int4(w.cpu(), 32)
    cpu = Int4Linear(values, scales, mins, 32)
    packed = cpu.packed.clone()
    moved = cpu.to(device)
    x = torch.randn(8, k, generator=g).to(device, torch.bfloat16)
    check("int4 moved to the device keeps its values", torch.equal(moved.values().cpu(), values),
          f"{tag}: {moved.layout}")
    e = _err(moved(x), x.float() @ moved.dequantize().float().t())
    check("int4 moved to the device == float reference", e < TOL, f"{tag}: rel err {e:.1e}")
    back = moved.cpu()
    check("int4 moved back to the CPU == its CPU packing", torch.equal(back.packed, packed), tag)
    # QLoRA: the gradient to the input through a frozen int4 layer on the device.
    m = Int4Linear.from_float(w, group_size=32)
    train_through_quantized(m)
    x = torch.randn(4, k, generator=g).to(device, torch.bfloat16).requires_grad_()
    m(x).float().sum().backward()
    e = _err(x.grad, m.dequantize().float().sum(0).expand(4, -1))
    check("QLoRA backward through int4 on the device", e < TOL, f"{tag}: rel err {e:.1e}")


# ------------------------------------------------------------------------------------------------ one layer

def layer_table(device: torch.device, n: int, k: int) -> list[str]:
    """Microseconds of x @ W.T through each path: where the weight-only kernels stop paying (quant_cuda's
    INT8_KERNEL_ROWS / INT4_KERNEL_ROWS)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g).to(device, torch.bfloat16)
    m4, m8 = Int4Linear.from_float(w, group_size=32), Int8Linear.from_float(w)
    cuda = device.type == "cuda"
    paths = {
        "bf16 GEMM": lambda x: F.linear(x, w),
        "int8 kernel": lambda x: torch.ops.aten._weight_int8pack_mm(x, m8.qweight, m8.scales.to(x.dtype)),
        "int8 dequantize + GEMM": lambda x: F.linear(x, m8.qweight.to(x.dtype)) * m8.scales.to(x.dtype),
        "int4 kernel": (lambda x: torch.ops.aten._weight_int4pack_mm(x, m4.packed, 32, m4.scales_and_zeros))
        if cuda and m4.layout == "cuda" else None,
        "int4 dequantize + GEMM": lambda x: F.linear(x, quant_cuda.int4_dequantize(
            m4.values(), m4.scales_and_zeros, 32, x.dtype)),
        "vlmkit int8 layer": m8, "vlmkit int4 layer": m4,
    }
    lines = [f"| rows | {' | '.join(paths)} |", "|---:|" + "---:|" * len(paths)]
    for rows in (1, 32, 600):
        x = torch.randn(rows, k, generator=g).to(device, torch.bfloat16)
        cells = [fmt(None) if f is None else _cell(lambda: fmt(seconds(lambda: f(x), device, repeat=10) * 1e6,
                                                                 " us", 0)) for f in paths.values()]
        lines.append(f"| {rows} | {' | '.join(cells)} |")
    return lines


def _cell(fn) -> str:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- shown in the table
        return why(e)


# ------------------------------------------------------------------------------------------------ models

def hf_config(family: str, tiny: bool):
    import transformers as tf

    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llava":
        vision = {**TINY_VISION, "image_size": 56} if tiny else VISION
        text = tf.LlamaConfig(**(TINY_TEXT if tiny else LLAVA7B), **special)
        n_img = (vision["image_size"] // vision["patch_size"]) ** 2
        return tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=text,
                              image_token_index=text.vocab_size - 2, image_seq_length=n_img, vision_feature_layer=-2,
                              vision_feature_select_strategy="default", projector_hidden_act="gelu", **special)
    vision = {**TINY_VISION, "image_size": 56} if tiny else IDEFICS2_VISION
    text = tf.MistralConfig(sliding_window=None, **(TINY_TEXT if tiny else MISTRAL7B), **special)
    return tf.Idefics2Config(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 2,
                             perceiver_config=dict(hidden_size=text.hidden_size,
                                                   **(TINY_PERCEIVER if tiny else IDEFICS2_PERCEIVER)), **special)


class HFModelSource(TensorSource):
    """A transformers model in memory as a vlmkit tensor source: its own tensors (no copy, no file)."""

    what = "model in memory"

    def __init__(self, hf_model):
        self.origin = type(hf_model).__name__
        hf = {**hf_model.config.to_dict(), "architectures": [self.origin]}
        self.family = family_for_architecture(hf)
        self.cfg = self.family.from_hf(hf)
        self.cfg.extra.update(hf_config=hf, hf_architecture=self.family.name)
        self.tensors = hf_model.state_dict()

    def keys(self, expected: dict) -> list[str]:
        key_map = build_key_map(expected, self.cfg.connector.kind, self.family.prefixes)
        by_canonical = {c: n for n, c in normalize_names(self.tensors, self.family.aliases).items()}
        self.where = {ours: by_canonical[hf] for ours, hf in key_map.items() if hf in by_canonical}
        return list(self.where)  # the builder names what is missing

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[self.where[name]]


def inputs(cfg, family: str, rows: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab, n_img = cfg.text_config.vocab_size, cfg.text_config.vocab_size - 2
    if family == "llava":
        size, tokens = cfg.vision_config.image_size, cfg.image_seq_length
        pixels = torch.randn(rows, 3, size, size, generator=g)
    else:
        size, tokens = cfg.vision_config.image_size, cfg.perceiver_config.resampler_n_latents
        pixels = torch.randn(rows, 1, 3, size, size, generator=g)
    text = torch.randint(3, n_img - 1, (PROMPT_TEXT,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((tokens,), n_img), text]).repeat(rows, 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels.to(torch.bfloat16)}
    if family != "llava":
        batch["pixel_attention_mask"] = torch.ones(rows, 1, size, size, dtype=torch.bool)
    assert vocab > n_img
    return {k: v.to(device) for k, v in batch.items()}


class Clock:
    """A generate() streamer: put() gets the prompt, then each new token as it is chosen (already on the host, so
    the device has finished it)."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def hf_speed(model, batch: dict, new: int, device: torch.device) -> tuple[float, float]:
    """(time to first token, decode tok/s after it) of one greedy generate() of exactly `new` tokens."""
    model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    clock, t = Clock(), time.perf_counter()
    model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock)
    first, last = clock.stamps[1], clock.stamps[-1]
    return first - t, batch["input_ids"].shape[0] * (len(clock.stamps) - 2) / max(last - first, 1e-9)


def vlmkit_speed(model, batch: dict, new: int, device: torch.device) -> tuple[float, float]:
    benchmark.time_tokens(model, batch, 2)  # warm-up
    return benchmark.time_tokens(model, batch, new)


def qlora_step(source: HFModelSource, batch: dict, device: torch.device) -> tuple[str, bool, str]:
    """One QLoRA training step on the device (int4 base quantized there, LoRA over it): a finite loss and gradients
    that reach the adapters through the int4 layers' backward."""
    from vlmkit.train.finetune import token_loss_sum
    from vlmkit.train.stages import apply_stage, get_stage

    model = build_model(source.cfg, source, torch.bfloat16, device)
    apply_stage(model, get_stage("qlora"))
    loss = token_loss_sum(model, {**batch, "labels": batch["input_ids"]})
    loss.backward()
    loss = loss.detach()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    layouts = sorted({m.layout for m in model.modules() if isinstance(m, Int4Linear)})
    ok = bool(torch.isfinite(loss)) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads) \
        and sum(int(bool(g.abs().sum() > 0)) for g in grads) >= len(grads) // 2  # LoRA A starts with zero grads
    return "QLoRA step on the model (int4 base on the device)", ok, f"{source.origin}: loss {float(loss):.3g}, " \
        f"{len(grads)} trainable tensors, int4 layouts {layouts}"


def model_rows(family: str, tiny: bool, device: torch.device, new: int, big_batch: int, bandwidth: float):
    import transformers as tf

    cfg = hf_config(family, tiny)
    cls = tf.LlavaForConditionalGeneration if family == "llava" else tf.Idefics2ForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):
        hf = cls._from_config(cfg, dtype=torch.bfloat16).eval()
    one, many = inputs(cfg, family, 1, device), inputs(cfg, family, big_batch, device)
    decoder = getattr(hf.model, "language_model", None) or hf.model.text_model
    hf_bytes = memory_bytes(decoder) + memory_bytes(hf.lm_head)
    rows = []

    with torch.inference_mode():
        reference = hf(**one).logits[:, -1].float()

    def row(label, speed, model, decode_bytes):
        try:
            measure(label, speed, model, decode_bytes)
        except Exception as e:  # noqa: BLE001 -- the row says what failed, the other rows still run
            rows.append((label, why(e)))
            print(f"  {family} {label}: {why(e)}", flush=True)

    def measure(label, speed, model, decode_bytes):
        with torch.inference_mode():
            err = _err(model(**one).logits[:, -1], reference)  # the same weights: equal up to bf16 (or quantization)
            ttft, tok1 = speed(model, one, new, device)
            _, tok_many = speed(model, many, new, device)
        share = tok1 * decode_bytes / (bandwidth * 1e9)
        rows.append((label, ttft, tok1, tok_many, decode_bytes / 1e9, share, err))
        print(f"  {family} {label}: ttft {ttft:.3f} s, decode {tok1:.1f} / {tok_many:.1f} tok/s, logits rel err "
              f"{err:.1e}", flush=True)

    row("transformers bf16", hf_speed, hf, hf_bytes)
    for mode in (None, "int8", "int4"):
        source = HFModelSource(hf)
        try:
            model = build_model(source.cfg, source, torch.bfloat16, device, QuantSpec(mode) if mode else None)
        except Exception as e:  # noqa: BLE001
            rows.append((f"vlmkit {mode or 'bf16'}", "building it: " + why(e)))
            continue
        row(f"vlmkit {mode or 'bf16'}", vlmkit_speed, model, memory_bytes(model.text))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        check = qlora_step(HFModelSource(hf), one, device)
    except Exception as e:  # noqa: BLE001
        check = ("QLoRA step on the model (int4 base on the device)", False, why(e))
    return rows, check


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (seconds; for tests and CPUs)")
    p.add_argument("--out", default=None, help="also write the Markdown report to this file")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="the large decode batch")
    p.add_argument("--families", default="llava,idefics2")
    p.add_argument("--skip-models", action="store_true", help="bandwidth, checks and the layer table only")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: pass --device cpu (with --tiny for a quick run)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the checks compare against float32 references
    start = time.perf_counter()
    m = benchmark.machine()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else m["cpu"]
    bandwidth = read_bandwidth(device, 0.0625 if args.tiny else 4)
    report = [f"# bench/gpu.py on {name}", "",
              f"torch {m['torch']}, {'tiny shapes' if args.tiny else 'real shapes'}, device {device}; measured read "
              f"bandwidth {bandwidth:,.0f} GB/s; int8 kernel up to {quant_cuda.INT8_KERNEL_ROWS} rows, int4 kernel "
              f"up to {quant_cuda.INT4_KERNEL_ROWS} rows.", "", "## Checks of the quantized layers", "",
              "| check | passed | detail |", "|---|---|---|"]
    results = checks(device, [(64, 128), (48, 96)] if args.tiny else [(4096, 4096), (11008, 4096), (4096, 11008)])
    report += [f"| {what} | {'yes' if ok else '**NO**'} | {detail} |" for what, ok, detail in results]
    n_layer = len(results)
    print("\n".join(report), flush=True)
    n, k = (64, 128) if args.tiny else (11008, 4096)
    report += ["", f"## One {n}x{k} layer, bf16 activations", ""] + layer_table(device, n, k)
    if not args.skip_models:
        report += ["", f"## Models (random weights), {args.new_tokens} new tokens", "",
                   f"| model | row | time to first token s | decode tok/s, batch 1 | decode tok/s, batch {args.batch} "
                   "| GB read per token | share of the bandwidth limit, batch 1 | last logits vs transformers, rel err |",
                   "|---|---|---:|---:|---:|---:|---:|---:|"]
        for family in args.families.split(","):
            label = {"llava": "LLaVA-1.5-7B", "idefics2": "Idefics2-8B"}[family] + (" (tiny)" if args.tiny else "")
            try:
                rows, check = model_rows(family, args.tiny, device, args.new_tokens, args.batch, bandwidth)
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory building it: the next family still runs
                rows, check = [("transformers bf16", why(e))], (f"{label} built and measured", False, why(e))
            results.append(check)
            results += [(f"{label} {r[0]} measured", False, r[1]) for r in rows if len(r) == 2]
            for r in rows:
                report.append(f"| {label} | {r[0]} | {r[1]} |" if len(r) == 2 else
                              f"| {label} | {r[0]} | {r[1]:.3f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.3g} | "
                              f"{r[5]:.0%} | {r[6]:.1e} |")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not args.skip_models:
        report += ["", "| check | passed | detail |", "|---|---|---|"]
        report += [f"| {what} | {'yes' if ok else '**NO**'} | {detail} |" for what, ok, detail in results[n_layer:]]
    report += ["", f"Whole run: {time.perf_counter() - start:.0f} s."]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
