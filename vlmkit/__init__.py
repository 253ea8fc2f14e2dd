"""vlmkit: open vision-language models (LLaVA, IDEFICS, Idefics2, Idefics3/SmolVLM) in one small library.

    import vlmkit
    m = vlmkit.load("default")                     # or a local Hugging Face folder of any supported family
    m.generate("<image>What color is the circle?", images=["examples/shapes.png"])     # 'red'

Importing this package loads nothing heavier than torch; submodules load on first use."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "VLM": ("vlmkit.api", "VLM"),
    "load": ("vlmkit.api", "load"),
    "save": ("vlmkit.api", "save"),
    "VLMConfig": ("vlmkit.config", "VLMConfig"),
    "VLMModel": ("vlmkit.models.vlm", "VLMModel"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
