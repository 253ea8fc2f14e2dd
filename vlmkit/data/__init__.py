"""Training and evaluation data: the synthetic generator (`vlmkit.data.synthetic`) and dataset readers.

Submodules load on first use: `from vlmkit.data import SyntheticGenerator` imports only Pillow and numpy."""

_LAZY = {name: "vlmkit.data.synthetic" for name in
         ("Sample", "SyntheticGenerator", "scene_labels", "benchmark_set", "CATEGORIES")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmkit.data' has no attribute {name!r}")
