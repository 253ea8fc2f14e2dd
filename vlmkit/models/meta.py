"""Models on the meta device (shapes and dtypes, no data) built fast. Under `torch.device("meta")` a few ops that
module constructors call -- the initializers' `normal_`, `arange` for RoPE tables -- run as torch's Python reference
implementations, and their first use imports sympy and torch._dynamo: ~1-2 s of every load and of `vlmkit info`.
`shapes_only` skips the initializers (a meta tensor holds no values to fill) and makes the few computed tables on
the CPU; it is a TorchFunctionMode, so it applies to this thread only."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# In-place fills that nn.init and modules' reset_parameters call: no-ops on tensors without data.
_FILLS = {getattr(torch.Tensor, name) for name in (
    "normal_", "uniform_", "zero_", "fill_", "exponential_", "geometric_", "log_normal_", "cauchy_", "random_",
    "bernoulli_",
)}
# Factories whose meta versions are Python references: made on the CPU, and left there -- arithmetic on meta
# tensors is Python references too. Constructors use them for small computed tables (RoPE frequencies, position
# ids): non-persistent buffers, which a load recomputes on the real device (TextDecoder.reset_buffers).
_FACTORIES = {torch.arange, torch.linspace, torch.logspace}


class _ShapesOnly(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        filling = func in _FILLS or getattr(func, "__module__", None) == "torch.nn.init"  # nn.init.*_: whole calls
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
        if filling and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        if func in _FACTORIES and kwargs.get("device") is None:
            return func(*args, **kwargs, device="cpu")
        return func(*args, **kwargs)


class shapes_only:
    """`with shapes_only(): model = VLMModel(cfg)` -> every tensor on the meta device, nothing initialised."""

    def __enter__(self):
        self._device, self._mode = torch.device("meta"), _ShapesOnly()
        self._device.__enter__()
        self._mode.__enter__()  # on top of the device context: sees each call first
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._device.__exit__(*exc)
        return False
