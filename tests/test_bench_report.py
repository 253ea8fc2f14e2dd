"""bench/run.py --keep: sections not measured again come from the earlier results, and the report says so."""

import importlib.util as iu
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench"


def load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = iu.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = iu.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


MACHINE = {"cpu": "cpu", "cores": 2, "isa": "AVX2", "memory": "1 GiB", "python": "3", "torch": "2",
           "transformers": "5", "llama_cpp_python": "not installed", "vlmkit": "0", "os": "linux", "gpu": None}


def test_keep_carries_the_skipped_sections_and_the_report_names_them():
    run, report = load("run"), load("report")
    old = {"date": "2026-11-22 05:57 UTC", "command": "vlmkit bench", "machine": {**MACHINE, "llama_cpp_python": "0.3"},
           "decode": {"llama.cpp Q4_1": {"b1": 50.0}}, "profiles": {"p": "table"},
           "accuracy": {"limit": 9, "float32": {"exact_match": 0.1}}}
    new = {"date": "2026-12-02 15:00 UTC", "command": "vlmkit bench --skip decode --skip profile --keep",
           "machine": MACHINE, "modes": ["float32"], "threads": 2,
           "accuracy": {"limit": 450, "float32": {"exact_match": 0.6}}}
    run.carry_over(new, old, ["decode", "profile", "memory"])  # no memory section before: nothing to carry
    assert new["decode"] == old["decode"] and new["profiles"] == old["profiles"] and "memory" not in new
    assert new["accuracy"]["float32"]["exact_match"] == 0.6  # measured again: not overwritten
    assert new["carried"]["sections"] == ["decode", "profiles"]
    text = report.render(new)
    assert "Sections decode, profiles come from the earlier run `vlmkit bench` (2026-11-22 05:57 UTC, on cpu" in text
    assert "llama-cpp-python 0.3" in text and "| float32 | 0.600 |" in text and "One run, one machine" not in text
    del new["carried"]
    assert "One run, one machine" in report.render(new)


def test_nothing_skipped_carries_nothing():
    run = load("run")
    new = {"date": "d"}
    run.carry_over(new, {"date": "old", "command": "c", "machine": MACHINE, "decode": {}}, [])
    assert new == {"date": "d"}


def test_the_suite_runs_as_python_m_bench():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=BENCH.parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m bench") and "--keep" in done.stdout
