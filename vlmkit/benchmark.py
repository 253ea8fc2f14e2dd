"""How fast a model runs on this machine, as llama-bench measures llama.cpp: load time, image preprocessing, time to
first token, prefill and decode tokens/s, peak memory (`vlmkit bench`). The repository's comparison suite
(`python -m bench`: vlmkit vs transformers and llama.cpp) times its rows with the same pieces."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import __version__
from .generation import GenerationConfig, generate_tokens
from .hardware import kernel_flags

QUESTION = "Describe this image."


# ------------------------------------------------------------------------------------------------ timing

def timed(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds (medians: on a shared machine single outliers are common)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def best(fn, repeat: int) -> tuple[float, float]:
    """fn() -> (seconds, rate): the median seconds and the best rate over `repeat` runs, after one warm-up."""
    fn()
    results = [fn() for _ in range(repeat)]
    times = sorted(r[0] for r in results)
    return times[len(times) // 2], max(r[1] for r in results)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run ahead of Python: wait for them before reading the clock
        torch.cuda.synchronize(device)


def time_tokens(model, batch: dict, new_tokens: int, pad_token_id: int = 0) -> tuple[float, float]:
    """(seconds to the first new token, decode tokens/s after it) of one greedy generation of exactly `new_tokens`
    tokens (no end-of-sequence id: every row runs to the end). Decode tokens/s = rows * (new_tokens - 1) / (time of
    the last token - time of the first): the prefill is not in it."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, pad_token_id=pad_token_id)
    device = batch["input_ids"].device
    t0 = time.perf_counter()
    steps = generate_tokens(model, batch, cfg)
    next(steps)
    _sync(device)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in steps)
    _sync(device)
    t2 = time.perf_counter()
    if n != new_tokens:
        raise RuntimeError(f"the generation stopped after {n} of {new_tokens} tokens")
    rows = batch["input_ids"].shape[0]
    return t1 - t0, rows * (n - 1) / (t2 - t1) if n > 1 else 0.0


# ------------------------------------------------------------------------------------------------ machine

def machine() -> dict:
    """CPU, cores, memory, torch and its threads, the GPU if any: what a timing depends on."""
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
        "flags": kernel_flags(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "vlmkit": __version__, "os": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def read_bandwidth(mib: int = 1024, repeat: int = 3) -> float:
    """Memory read bandwidth in GB/s: a float32 tensor far past the caches, summed (the decode roofline)."""
    x = torch.ones(mib * 2**20 // 4)
    return x.numel() * 4 / timed(x.sum, repeat) / 1e9


def gemm_peak(n: int = 2048, repeat: int = 3) -> float:
    """float32 matmul throughput in GFLOP/s on n x n matrices (the prefill roofline)."""
    a = torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ a, repeat) / 1e9


def proc_status_kb(field: str) -> Optional[int]:
    """A field of /proc/self/status in KiB (VmHWM, RssAnon, ...); None where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> Optional[int]:
    """This process's resident memory now (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """VmHWM: this process image's peak RSS. (Not ru_maxrss on Linux: it carries the parent's peak across fork +
    exec, so every child would report its parent's footprint.)"""
    kb = proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


# ------------------------------------------------------------------------------------------------ inputs

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


# ------------------------------------------------------------------------------------------------ one model

def bench_model(load: Callable[[], object], image=None, prompt: str = QUESTION, new_tokens: int = 128,
                repeat: int = 3, log: Callable[[str], None] = lambda message: None) -> dict:
    """Time `load()` (-> a `vlmkit.VLM`) and one image + prompt answered greedily with exactly `new_tokens` tokens.

    Times are medians of `repeat` runs after a warm-up; tokens/s the best run (as bench/ reports them). The
    prefill runs on a batch already preprocessed, so preprocessing + prefill = the time to the first token. Peak
    memory: the process's peak RSS on CPU (and what it grew by from just before loading), the peak of allocated
    device memory on a GPU."""
    image = test_image() if image is None else image
    before = rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m = load()
    load_s = time.perf_counter() - t0
    log(f"loaded in {load_s:.2f} s")
    device = m.model.device
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]

    def preprocess() -> dict:
        batch = m.processor([messages], max_length=m.context_length - new_tokens)
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    preprocess_s = timed(preprocess, repeat)
    batch = preprocess()
    prompt_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    pad = m.processor.tokenizer.pad_token_id or 0
    prefill_s, decode_rate = best(lambda: time_tokens(m.model, batch, new_tokens, pad), repeat)
    log(f"prefill {prefill_s * 1e3:.0f} ms for {prompt_tokens} tokens, decode {decode_rate:.1f} tokens/s")
    info = m.info()
    results = {
        "model": info["folder"], "family": info["family"], "parameters": info["parameters"],
        "weights_bytes": info["memory_bytes"], "dtype": info["dtype"], "quantization": info["quantization"],
        "device": str(device), "threads": torch.get_num_threads(), "machine": machine(),
        "new_tokens": new_tokens, "repeat": repeat, "prompt_tokens": prompt_tokens, "load_s": load_s,
        "preprocess_s": preprocess_s, "prefill_s": prefill_s, "ttft_s": preprocess_s + prefill_s,
        "prefill_tokens_per_s": prompt_tokens / prefill_s, "decode_tokens_per_s": decode_rate,
    }
    if device.type == "cuda":
        results["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        results["peak_memory_kind"] = "allocated on the GPU"
    else:
        results["peak_memory_bytes"] = peak_rss_bytes()
        results["peak_memory_kind"] = "process RSS"
        if before is not None:
            results["peak_memory_growth_bytes"] = results["peak_memory_bytes"] - before
    return results


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def render(r: dict) -> str:
    """A bench_model result as a heading line and a Markdown table."""
    quant = f", {r['quantization']}" if r.get("quantization") else ""
    peak = f"{_size(r['peak_memory_bytes'])} ({r['peak_memory_kind']}"
    if r.get("peak_memory_growth_bytes") is not None:
        peak += f"; +{_size(r['peak_memory_growth_bytes'])} from loading and answering"
    rows = [
        ("load", f"{r['load_s']:.2f} s"),
        ("preprocess (1 image)", f"{r['preprocess_s'] * 1e3:.1f} ms"),
        (f"prefill ({r['prompt_tokens']} tokens)", f"{r['prefill_tokens_per_s']:,.1f} tokens/s"),
        ("time to first token", f"{r['ttft_s'] * 1e3:.1f} ms"),
        (f"decode ({r['new_tokens']} tokens)", f"{r['decode_tokens_per_s']:,.1f} tokens/s"),
        ("peak memory", peak + ")"),
    ]
    head = (f"{r['model']}: {r['family']}, {r['parameters'] / 1e6:,.1f}M parameters, {_size(r['weights_bytes'])} "
            f"of weights, {r['dtype']}{quant}, {r['device']}, {r['threads']} threads")
    return "\n".join([head, "", "| test | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]) + "\n"
