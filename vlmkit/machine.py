"""What this machine has, read without torch (whose import alone takes about a second): the CPU's feature flags,
whether a GPU driver is present, and the dtype names vlmkit accepts. `vlmkit.hardware` decides devices and dtypes
from these; `vlmkit info`'s torch-free path (vlmkit.checkpoints.header_info) uses them where they are certain."""

from __future__ import annotations

import functools
import glob
import os
import sys
from pathlib import Path

# The dtype spellings load(dtype=...) and the command line accept -> the dtype's name (torch.<name>).
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}  # bytes an element, by dtype name


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags as /proc/cpuinfo lists them (Linux; empty elsewhere: then nothing is assumed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM spelling
            flags.update(value.split())
    return frozenset(flags)


def has_bf16_units(flags) -> bool:
    """True for CPUs with bf16 matrix instructions (AMX or AVX512-BF16). Elsewhere bf16 on the CPU is emulated and
    slower than float32 (measured on an AVX2 EPYC: a 256x1536x1536 matmul takes 127 ms in bf16, 32 ms in float32)."""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_dtype(flags) -> str:
    """The compute dtype vlmkit picks on a CPU with these flags (vlmkit.hardware.compute_dtype's CPU rule)."""
    return "bfloat16" if has_bf16_units(flags) else "float32"


def surely_cpu_only() -> bool:
    """True when "auto" can only mean the CPU: Linux with no NVIDIA or AMD GPU driver loaded (no CUDA or ROCm device
    can exist then). False elsewhere (macOS may have MPS; other systems are not inspected): ask torch."""
    if not sys.platform.startswith("linux"):
        return False
    return not (os.path.exists("/proc/driver/nvidia") or glob.glob("/dev/nvidia*") or os.path.exists("/dev/kfd"))
