"""What this machine offers: the device to run on ("auto": CUDA, then Apple MPS, then the CPU) and the compute dtype
that is fast on it. Checked before any weight is read, so a wrong device fails at once."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .machine import DTYPE_NAMES, cpu_dtype, cpu_flags, has_bf16_units

# The dtype spellings load(dtype=...) and the command line accept.
DTYPES = {name: getattr(torch, dtype) for name, dtype in DTYPE_NAMES.items()}
AUTO = "auto"


def parse_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch float dtype or one of DTYPES' names -> the dtype (None stays None)."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


# The flags that decide which matmul kernels are fast: what benchmarks record beside their numbers.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def kernel_flags() -> str:
    """The KERNEL_FLAGS this CPU has, space-separated ("none of them" when it has none)."""
    have = cpu_flags()
    return " ".join(f for f in KERNEL_FLAGS if f in have) or "none of " + " ".join(KERNEL_FLAGS)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (vlmkit.machine.has_bf16_units)."""
    return has_bf16_units(cpu_flags())


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices this process can use, in the order "auto" prefers them last to first (cpu always)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return out


def _why_not(dev: torch.device) -> str:
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            return "torch built without CUDA"
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return "no GPU visible"
        return f"only {torch.cuda.device_count()} GPU(s)"
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        return "torch built without MPS" if mps is None or not mps.is_built() else "no Apple GPU here"
    return "vlmkit runs on cpu, cuda or mps"


def resolve_device(spec: Union[None, str, torch.device] = None) -> torch.device:
    """None or "auto" -> CUDA when available, then Apple MPS, then the CPU. An explicit device is checked: one this
    process cannot use raises ValueError naming it and what is available."""
    if spec is None or str(spec) == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(spec)!r}; use auto, cpu, cuda, cuda:N or mps") from None
    ok = (dev.type == "cpu"
          or (dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count())
          or (dev.type == "mps" and _mps_available()))
    if not ok:
        raise ValueError(f"device {str(spec)!r} is not available here ({_why_not(dev)}); available: "
                         f"{', '.join(available_devices())}")
    return dev


def compute_dtype(device: Union[None, str, torch.device] = None, requested=None) -> torch.dtype:
    """The dtype the float parts of a model compute in on `device`: `requested` when given (dtype= overrides);
    else bf16 on a CUDA GPU that supports it (fp16 on older ones), fp16 on Apple MPS, bf16 on a CPU with bf16
    matrix units, float32 on other CPUs (bf16 is emulated there, ~4x slower than float32)."""
    if requested is not None:
        return parse_dtype(requested)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "mps":
        return torch.float16
    return getattr(torch, cpu_dtype(cpu_flags()))
