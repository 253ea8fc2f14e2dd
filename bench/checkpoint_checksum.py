"""What the checkpoint checksum costs: writing and reading a training checkpoint with and without its sha256, and
the training-data fingerprint (text + image paths and sizes) for N examples. Prints a markdown table.

    python bench/checkpoint_checksum.py [--mb 64 256] [--examples 10000 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmkit.benchmark import timed
from vlmkit.data.readers import Example
from vlmkit.train.checkpoint import atomic_save, data_fingerprint, read_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--examples", type=int, nargs="+", default=[10_000, 100_000])
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}\n")
    print("| checkpoint | save_file | atomic_save (+sha256, fsync) | load_file | read_checkpoint (+verify) |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            tensors = {f"param/{i}": torch.randn(mb * 2**20 // 4 // 16) for i in range(16)}
            plain, checked = Path(tmp) / "plain.safetensors", Path(tmp) / "checked.safetensors"
            t_save = timed(lambda: save_file(tensors, str(plain), metadata={"step": "1"}))
            t_atomic = timed(lambda: atomic_save(checked, tensors, {"step": "1"}))
            t_load = timed(lambda: load_file(str(plain)))
            t_read = timed(lambda: read_checkpoint(checked))
            print(f"| {mb} MB | {t_save:.3f} s | {t_atomic:.3f} s | {t_load:.3f} s | {t_read:.3f} s |")
        image = Path(tmp) / "a.png"
        image.write_bytes(b"x" * 1000)
        print("\n| examples (1 image file each) | data_fingerprint |\n|---:|---:|")
        for n in args.examples:
            data = [Example("chat", images=[str(image)], turns=[("user", f"<image>\nWhat is {i}?"),
                                                                   ("assistant", f"It is {i}.")]) for i in range(n)]
            print(f"| {n} | {timed(lambda: data_fingerprint(data)):.3f} s |")


if __name__ == "__main__":
    main()
