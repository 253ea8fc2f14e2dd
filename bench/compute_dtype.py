"""Time to first token (one image) of a model loaded with the compute dtype the hardware gets by default
(vlmkit.hardware.compute_dtype) vs bf16 forced (the old behaviour for bf16 checkpoints), float and quantized, side by
side in one process. Prints a markdown table.

    python -m bench.compute_dtype /tmp/w21dev-model [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from PIL import Image

import vlmkit
from vlmkit.benchmark import timed
from vlmkit.hardware import compute_dtype, cpu_has_native_bf16, kernel_flags

ROWS = [  # (label, quantize, dtype)
    ("fp32 (no quantization)", None, None),
    ("int8, bf16 forced (old)", "int8", "bf16"),
    ("int8, default", "int8", None),
    ("int4, bf16 forced (old)", "int4", "bf16"),
    ("int4, default", "int4", None),
]


def ttft(m, image, repeats: int) -> tuple[float, str]:
    prompt = "<image>\nDescribe the picture in detail."
    seconds = timed(lambda: m.generate(prompt, images=[image], max_new_tokens=1), repeats)
    return seconds, m.generate(prompt, images=[image], max_new_tokens=8)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    image = Image.new("RGB", (336, 336), (120, 60, 200))
    default = compute_dtype("cpu")
    bf16 = "yes" if cpu_has_native_bf16() else "no"
    print(f"threads {torch.get_num_threads()}; CPU bf16 units: {bf16}; default compute dtype: {default}; "
          f"flags: {kernel_flags()}\n")
    print("| load | compute dtype | load s | time to first token s | vs fp32 | first 8 tokens |")
    print("|---|---|---:|---:|---:|---|")
    base = None
    for label, quantize, dtype in ROWS:
        t = time.perf_counter()
        m = vlmkit.load(args.model, quantize=quantize, dtype=dtype, caches=False)
        load_s = time.perf_counter() - t
        seconds, text = ttft(m, image, args.repeats)
        base = base or seconds
        print(f"| {label} | {m.info()['dtype']} | {load_s:.1f} | {seconds:.2f} | {seconds / base:.2f}x | "
              f"{text!r} |", flush=True)
        del m
        gc.collect()


if __name__ == "__main__":
    main()
