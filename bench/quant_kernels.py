"""Quantized linear kernels side by side in one process, per decoder layer shape and row count M.

    PYTHONPATH=. python -m bench.quant_kernels [--shapes 2048x2048,5632x2048] [--rows 1,8,64,600] [--reps 3]

Columns (ms, median of --reps): fp32 F.linear; torch's weight-only int8/int4 kernels with fp32 and bf16
activations; dequantize the layer (the prefill path's temporary) then an fp32 GEMM; int8 GEMM with dynamically
quantized activations (torch.ops.quantized.linear_dynamic on fbgemm/onednn packed weights; torch._int_mm).
With --packed instead: the int8 GEMM as vlmkit runs it (quant_kernels.int8_gemm, per-row activation scale) on a
weight packed once (`i8 packed`, quant_packed.PackedInt8Linear) against packing per call (`pack`, `pack+gemm`) and,
for int4, requantizing to int8 per output channel then packing per call (`i4 requant+pack+gemm`); min of --reps
rounds, methods interleaved within a round (a shared box: the min is the least disturbed).
Also prints the CPU flags that matter and the measured read bandwidth (the decode roofline).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vlmkit import benchmark
from vlmkit.hardware import kernel_flags
from vlmkit.models import quant, quant_kernels, quant_packed


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn() after one warm-up."""
    return benchmark.timed(fn, reps) * 1e3


def try_(fn):
    try:
        fn()
        return fn
    except Exception:  # a backend this torch or CPU lacks: the column says n/a
        return None


def bench_shape(n: int, k: int, rows: list, reps: int) -> list:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k**0.5
    i8 = quant.Int8Linear.from_float(w)
    i4 = quant.Int4Linear.from_float(w)
    packed = {}
    for engine in ("fbgemm", "onednn"):
        if engine in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = engine
            wq = torch.quantize_per_channel(w, i8.scales.float(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
            packed[engine] = torch.ops.quantized.linear_prepack(wq, None)
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=g)
        xb = x.bfloat16()
        cols = {
            "fp32": lambda: F.linear(x, w),
            "i8 k fp32": try_(lambda: torch.ops.aten._weight_int8pack_mm(x, i8.qweight, i8.scales.float())),
            "i8 k bf16": lambda: torch.ops.aten._weight_int8pack_mm(xb, i8.qweight, i8.scales),
            "i4 k fp32": try_(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, i4.packed, i4.group_size, i4.scales_and_zeros.float())),
            "i4 k bf16": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                xb, i4.packed, i4.group_size, i4.scales_and_zeros),
            "i8 deq+fp32": lambda: F.linear(x, quant_kernels.int8_dequantize(i8.qweight, i8.scales, torch.float32)),
            "i4 deq+fp32": lambda: x @ quant_kernels.int4_dequantize_t(
                i4.packed, i4.scales_and_zeros, i4.group_size, n, k, torch.float32),
            "i8 layer": lambda: i8(x),
            "i4 layer": lambda: i4(x),
        }
        for engine, p in packed.items():
            def dyn(p=p, engine=engine):
                torch.backends.quantized.engine = engine
                return torch.ops.quantized.linear_dynamic(x, p, True)
            cols[f"dyn {engine}"] = try_(dyn)
        xq = torch.randint(-127, 127, (max(m, 17), k), dtype=torch.int8)
        cols["_int_mm"] = try_(lambda: torch._int_mm(xq, i8.qweight.t()))
        if m > 8:  # fp32 activations and torch._int_mm are 20-60x off from M = 8 on (measured): not worth minutes
            cols.update({c: None for c in ("i8 k fp32", "i4 k fp32", "_int_mm")})
        out.append((m, {name: None if fn is None else timed(fn, reps) for name, fn in cols.items()}))
    return out


def requantize_int4(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """An Int4Linear's weights as int8 per output channel (the int4 -> int8 GEMM route, measured, not taken)."""
    w = layer.dequantize()
    s = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / s[:, None]).to(torch.int8), s


def bench_packed(n: int, k: int, rows: list, reps: int) -> list:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k**0.5
    i8, i4 = quant.Int8Linear.from_float(w), quant.Int4Linear.from_float(w)
    packed = quant_kernels.pack_int8(i8.qweight, i8.scales.float())
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=g)
        cols = {
            "fp32": lambda: F.linear(x, w),
            "i8 k bf16": lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), i8.qweight, i8.scales),
            "i8 layer (plain)": lambda: i8(x),
            "i4 layer": lambda: i4(x),
            "i8 packed": lambda: quant_kernels.int8_gemm(x, packed),
        }
        per_call = {  # packing per call: only worth a look for prefills
            "pack": lambda: quant_kernels.pack_int8(i8.qweight, i8.scales.float()),
            "pack+gemm": lambda: quant_kernels.int8_gemm(x, quant_kernels.pack_int8(i8.qweight, i8.scales)),
            "i4 requant+pack+gemm": lambda: quant_kernels.int8_gemm(x, quant_kernels.pack_int8(*requantize_int4(i4))),
        }
        cols.update(per_call if m >= quant_kernels.PREFILL_ROWS else dict.fromkeys(per_call))
        cols = {name: fn for name, fn in cols.items() if fn is not None}
        best = dict.fromkeys(list(cols) + [c for c in per_call if c not in cols])
        best.update({name: float("inf") for name in cols})
        for fn in cols.values():
            fn()
        for _ in range(reps):
            for name, fn in cols.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
        out.append((m, best))
    return out


def e2e(folder: str, prompt_tokens: int, new_tokens: int) -> None:
    """TTFT and decode tok/s of one checkpoint in fp32 / int8 / int4, the quantized ones with the prefill path
    (after) and with every row forced through the kernels (before), side by side in this one process."""
    import gc

    from PIL import Image

    import vlmkit

    image = Image.new("RGB", (336, 336), (120, 60, 200))
    prompt = "<image>" + " hello" * max(prompt_tokens - 577, 1)
    print(f"\n{folder}, prompt ~{prompt_tokens} tokens (576 image tokens), {new_tokens} new tokens")
    print("| model | path | TTFT s | decode tok/s b=1 | decode tok/s b=8 | text |\n|---|---|---:|---:|---:|---|")
    threshold = quant_kernels.PREFILL_ROWS
    paths = {None: [("float", None)], "int8": [("kernels", 10**9), ("prefill", None), ("packed", "d"),
                                             ("packed + vision int8", "v")],
             "int4": [("prefill", None), ("+ vision int8 packed", "v")]}
    for mode in (None, "int8", "int4"):
        m = vlmkit.load(folder, dtype="float32", quantize=mode, caches=False)
        for path, rows in paths[mode]:
            if isinstance(rows, str):  # pack in place: the paths after this one see the packed layers
                quant_packed.pack_model(m.model, vision=rows == "v", decoder=mode == "int8")
            quant_kernels.PREFILL_ROWS = rows if isinstance(rows, int) else threshold
            # batch 8 decodes after a short text prompt: 8 image prompts would spend minutes in prefill here
            gen = lambda n, b=1: (m.generate(prompt, images=[image], max_new_tokens=n) if b == 1 else
                                  m.generate_batch(["Tell me a story"] * b, max_new_tokens=n))
            t0 = time.perf_counter(); gen(1); ttft = time.perf_counter() - t0
            t0 = time.perf_counter(); text = gen(new_tokens); t1 = time.perf_counter() - t0
            t0 = time.perf_counter(); gen(1, 8); t8a = time.perf_counter() - t0
            t0 = time.perf_counter(); gen(new_tokens, 8); t8 = time.perf_counter() - t0
            print(f"| {mode or 'fp32'} | {path} | {ttft:.2f} | {(new_tokens - 1) / max(t1 - ttft, 1e-9):.2f} | "
                  f"{8 * (new_tokens - 1) / max(t8 - t8a, 1e-9):.2f} | {text[:30]!r} |", flush=True)
        quant_kernels.PREFILL_ROWS = threshold
        m = None  # free this model before the next loads
        gc.collect()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2048x2048,5632x2048,2048x5632,4096x4096,11008x4096")
    ap.add_argument("--rows", default="1,8,64,600")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--packed", action="store_true", help="the packed int8 GEMM against the prefill paths")
    ap.add_argument("--e2e", metavar="FOLDER", help="instead: TTFT / decode of a checkpoint, fp32 vs int8 vs int4")
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args(argv)
    if a.e2e:
        return e2e(a.e2e, a.prompt_tokens, a.new_tokens)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, flags: {kernel_flags()}, quantized engines: "
          f"{torch.backends.quantized.supported_engines}")
    bw = benchmark.read_bandwidth(256, a.reps)
    print(f"read bandwidth (sum of 256 MiB fp32): {bw:.1f} GB/s\n")
    header = None
    for shape in a.shapes.split(","):
        n, k = map(int, shape.split("x"))
        fn = bench_packed if a.packed else bench_shape
        for m, res in fn(n, k, [int(r) for r in a.rows.split(",")], a.reps):
            if header is None:
                header = list(res)
                print("| N x K | M | " + " | ".join(header) + " | i4 k bf16 % of BW (M=1) |")
                print("|---|---:|" + "---:|" * (len(header) + 1))
            cells = ["n/a" if res.get(h) is None else f"{res[h]:.2f}" for h in header]
            roof = f"{n * k / 2 / (res['i4 k bf16'] / 1e3) / 1e9 / bw * 100:.0f}%" if m == 1 and "i4 k bf16" in res else ""
            print(f"| {n}x{k} | {m} | " + " | ".join(cells) + f" | {roof} |", flush=True)


if __name__ == "__main__":
    main()
