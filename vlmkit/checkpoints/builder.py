"""One way from stored tensors to a model. A `TensorSource` hands out a checkpoint's tensors under our names, one at
a time (safetensors shards through a family's key map, a GGUF file, an adapter folder); `build_model` fills a
meta-device VLMModel from it, quantizing layer by layer as the weights arrive when asked, so the float model never
exists whole. Every loader goes through it: names missing, unexpected or mis-shaped are errors that name them.
It also owns the load's progress bar (bytes of the checkpoint read and built, on stderr: `progress_enabled`)."""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocator import map_large_allocations, release_freed_memory, unmap_large_allocations
from ..config import VLMConfig
from ..models.meta import shapes_only
from ..models.quant import QuantSpec, describe, make_module
from ..models.vlm import VLMModel
from .folder_config import CheckpointError


class TensorSource:
    """A checkpoint's tensors under our names. `keys` may raise CheckpointError naming the file's own names."""

    origin = ""  # the file or folder, for messages
    what = "checkpoint"

    def keys(self, expected: dict) -> list[str]:
        """Our names of the tensors held, given the model's (`expected`: name -> meta tensor)."""
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read_quantized(self, name: str, kind: str, dtype: torch.dtype) -> Optional[nn.Module]:
        """The module for weight `name` straight from a quantized form the source holds, or None (the builder then
        quantizes `read(name)`)."""
        return None

    def nbytes(self, name: str) -> Optional[int]:
        """Bytes the checkpoint stores for `name` (what reading it costs), or None when unknown (the progress bar
        then counts tensors)."""
        return None

    def label(self, name: str) -> str:
        """How the checkpoint spells `name` (for messages)."""
        return name

    def close(self) -> None:
        pass


NO_PROGRESS_ENV = "VLMKIT_NO_PROGRESS"


def progress_enabled(progress: Optional[bool] = None) -> bool:
    """Whether a load shows its progress bar. True / False: as asked. None (auto): when stderr is a terminal and
    the environment variable VLMKIT_NO_PROGRESS is unset (or 0/false/no) -- like transformers' bars, so logs,
    pipes and tests stay clean."""
    if progress is not None:
        return bool(progress)
    if os.environ.get(NO_PROGRESS_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _progress_bar(source: TensorSource, names: list, quantize, progress: Optional[bool]):
    """(bar, step): the bar over the bytes `names` hold in the source (over tensors when it cannot say), and the
    amount each name advances it by."""
    sizes = [source.nbytes(name) for name in names]
    what = "Loading and quantizing weights" if quantize else "Loading weights"
    if any(size is None for size in sizes):
        bar = tqdm(total=len(names), unit="tensor", desc=what, file=sys.stderr, disable=not progress_enabled(progress),
                   dynamic_ncols=True)
        return bar, dict.fromkeys(names, 1)
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=what, file=sys.stderr,
               disable=not progress_enabled(progress), dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]")
    return bar, dict(zip(names, sizes))


def _advancing(names: list, bar, step: dict):
    """`names`, each counted on the bar once the loop body is done with it."""
    for name in names:
        yield name
        bar.update(step[name])


def build_model(cfg: VLMConfig, source: TensorSource, dtype: Optional[torch.dtype] = None, device=None,
                quantize: Optional[QuantSpec] = None, progress: Optional[bool] = None) -> VLMModel:
    """A VLMModel of `cfg` holding the source's tensors. dtype: floats cast to it (None: as stored); quantize: the
    modules it names become int8/int4 as their weights arrive (`model.quantization` then says what was done);
    progress: the bar on stderr (None: `progress_enabled`'s auto rule)."""
    if not quantize:
        return _build(cfg, source, dtype, device, quantize, progress)
    map_large_allocations()
    try:
        return _build(cfg, source, dtype, device, quantize, progress)
    finally:
        unmap_large_allocations()
        release_freed_memory()  # what the allocator still holds of the read copies and temporaries


def _build(cfg, source, dtype, device, quantize, progress) -> VLMModel:
    with shapes_only():
        model = VLMModel(cfg)
    expected = model.state_dict()
    kinds = quantize.kinds(model) if quantize else {}
    floats, biases, bad, bar = {}, {}, [], None
    try:
        names = source.keys(expected)
        missing, unexpected = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source.origin}: {source.what} does not fit the model: missing {missing[:10]}, "
                                  f"unexpected {unexpected[:10]}")
        bar, step = _progress_bar(source, names, quantize, progress)
        for name in _advancing(names, bar, step):
            module, _, leaf = name.rpartition(".")
            kind, shape = kinds.get(module), tuple(expected[name].shape)
            built = source.read_quantized(name, kind, dtype or torch.float32) if kind and leaf == "weight" else None
            if built is not None:
                if (built.out_features, built.in_features) != shape:
                    bad.append(f"{source.label(name)}: {(built.out_features, built.in_features)} != expected {shape}")
                model.set_submodule(module, built)
                continue
            t = source.read(name)
            if tuple(t.shape) != shape:
                bad.append(f"{source.label(name)}: {tuple(t.shape)} != expected {shape}")
                continue
            if kind and leaf == "weight":  # cast block by block inside: no whole float copy of the weight
                model.set_submodule(module, make_module(kind, t, dtype=dtype, group_size=quantize.group_size))
            else:
                t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                if kind:
                    biases[module] = t
                else:
                    floats[name] = t
            del t  # the read copy of a quantized weight goes now, not at the next tensor
    finally:
        source.close()
        if bar is not None:
            bar.close()
    if bad:
        raise CheckpointError(f"{source.origin}: mis-shaped tensors: " + "; ".join(bad[:20]))
    for module, bias in biases.items():
        model.get_submodule(module).bias = nn.Parameter(bias, requires_grad=False)
    model.load_state_dict(floats, strict=False, assign=True)  # every name was checked above
    model.text.reset_buffers()
    if quantize:
        describe(model, quantize.mode, quantize.group_size, kinds)
    if device is not None:
        model.to(device)
    return model.eval()

