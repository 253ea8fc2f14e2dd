"""Evaluation: benchmark metrics (`vlmkit.eval.metrics`) and the benchmark runner (`evaluate`, `vlmkit eval`).

    from vlmkit.eval import evaluate, metrics
    results = evaluate("path/to/model", "textvqa", "textvqa_val.parquet", limit=200, output_dir="out/textvqa")
    print(results["markdown"])
    metrics.vqav2_accuracy("two", ["2"] * 10)       # 1.0

Built-in tasks: vqav2, textvqa, docvqa, chartqa, mmmu, mmbench, synthetic; or a YAML/JSON task spec
(`vlmkit.eval.spec`). Submodules load on first use: importing `vlmkit.eval.metrics` needs nothing but Python.
"""

_LAZY = {
    "evaluate": ("vlmkit.eval.runner", "evaluate"),
    "results_markdown": ("vlmkit.eval.runner", "results_markdown"),
    "load_predictions": ("vlmkit.eval.runner", "load_predictions"),
    "Task": ("vlmkit.eval.tasks", "Task"),
    "TASKS": ("vlmkit.eval.tasks", "TASKS"),
    "get_task": ("vlmkit.eval.spec", "get_task"),
    "task_names": ("vlmkit.eval.tasks", "task_names"),
    "read_rows": ("vlmkit.data.files", "read_rows"),
    "load_task_spec": ("vlmkit.eval.spec", "load_task_spec"),
}

__all__ = sorted(_LAZY) + ["metrics", "tasks", "spec", "runner"]


def __getattr__(name):
    import importlib

    if name in ("metrics", "tasks", "spec", "runner"):
        return importlib.import_module(f"vlmkit.eval.{name}")
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmkit.eval' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + ["metrics", "tasks", "spec", "runner"])
