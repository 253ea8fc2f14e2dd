"""Wall time of `vlmkit info MODEL` (issue 24: under 1 s), best of N fresh processes, per model; with --via
describe the same models through vlmkit.api.describe (the torch path `info` took before header_info).

    python bench/info_time.py default /path/to/llava-folder [--repeat 5] [--via describe]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def best_wall(command: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--via", choices=("info", "describe"), default="info")
    args = parser.parse_args()
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; best of {args.repeat}\n")
    print(f"| model | {args.via} wall s |\n|---|---:|")
    for model in args.models:
        if args.via == "info":
            command = [sys.executable, "-m", "vlmkit", "info", model, "--json"]
        else:
            command = [sys.executable, "-c", f"import vlmkit.api as a; a.describe({model!r})"]
        print(f"| {model} | {best_wall(command, args.repeat):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
