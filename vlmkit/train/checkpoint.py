"""The training checkpoint: one format, one writer, for every run of the training loop.

One safetensors file holds the trainable weights (`param/NAME`), the AdamW moments (`exp_avg/NAME`,
`exp_avg_sq/NAME`, `opt_step/NAME`), the torch RNG state (`rng/torch`) and, in its metadata, the step and a JSON
`extra` (what the run needs to check and resume: its data's fingerprint, counters). It is written atomically (temp
file, fsync, rename) with a sha256 of its content stored inside it, verified when read back (safetensors itself has
no checksum, so flipped bytes would otherwise load as silently wrong weights); temp files a crash left behind are
removed when a run starts. Under FSDP every process takes part in gathering the weights; the first one writes.

The checksum covers every tensor (name, dtype, shape, bytes) and the other metadata entries; it lives in the file's
own metadata under "sha256", so a checkpoint and its checksum can never be out of step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints.io import atomic_write, temp_files
from . import distributed as D

CHECKSUM = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted (corrupt, unreadable): names the file and what to do."""


def content_sha256(tensors: dict, metadata: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != CHECKSUM):
        h.update(f"meta:{key}={metadata[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"tensor:{name}:{str(t.dtype)}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def atomic_save(path: Path, tensors: dict, metadata: dict) -> None:
    """safetensors written to a temp file in the same folder, fsynced, then renamed over `path`: a run killed
    mid-write leaves the previous checkpoint intact. The content's sha256 goes into the metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {k: v for k, v in metadata.items() if k != CHECKSUM}
    metadata[CHECKSUM] = content_sha256(tensors, metadata)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _what_to_do(path: Path) -> str:
    return f"delete {path} to start over from scratch, or pass another --out"


def read_checkpoint(path: Path, log: Optional[Callable[[str], None]] = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a checkpoint written by `atomic_save`, its checksum verified. A file without one
    (written before checksums were stored) is read with a warning."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is corrupt or "
                              f"not a checkpoint: {_what_to_do(path)}") from None
    stored = metadata.get(CHECKSUM)
    if stored is None:
        (log or (lambda s: print(s, file=sys.stderr, flush=True)))(
            f"warning: checkpoint {path} has no checksum (written by an older vlmkit); resuming without verifying it")
    elif content_sha256(tensors, metadata) != stored:
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match the sha256 stored when it "
                              f"was written; {_what_to_do(path)}")
    return tensors, metadata


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temp files of `path` that a run killed mid-write left in its folder; returns them."""
    stale = temp_files(path)
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ------------------------------------------------------------------------------------------- training state

def train_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    """Trainable weights and AdamW moments as whole CPU tensors (collective under FSDP: every process calls it)."""
    tensors = {}
    for name, p in D.unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        tensors[f"param/{name}"] = D.full_tensor(p)
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}/{name}"] = D.full_tensor(state[key])
        if "step" in state:
            tensors[f"opt_step/{name}"] = torch.as_tensor(D.full_tensor(torch.as_tensor(state["step"])),
                                                          dtype=torch.float32).reshape(1)
    return tensors


def load_train_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], tensors: dict,
                     where: str = "the checkpoint") -> None:
    """`train_state`'s tensors back into the model (this process's shard under FSDP) and, given one, the optimizer."""
    params = {n: p for n, p in D.unwrap(model).named_parameters() if p.requires_grad}
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise ValueError(f"{where} lacks trainable parameters {missing[:5]} (a different stage or recipe?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(D.like(tensors[f"param/{name}"], p))
            if optimizer is not None and f"exp_avg/{name}" in tensors:
                optimizer.state[p] = {
                    "step": tensors[f"opt_step/{name}"].reshape(()).clone(),
                    "exp_avg": D.like(tensors[f"exp_avg/{name}"], p),
                    "exp_avg_sq": D.like(tensors[f"exp_avg_sq/{name}"], p),
                }


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict,
                    ctx: Optional[D.DistContext] = None) -> None:
    """The run's state at `step` (see the module docstring); `extra` must be JSON. Collective under FSDP."""
    ctx = ctx or D.DistContext()
    tensors = train_state(model, optimizer)
    if ctx.is_main:
        tensors["rng/torch"] = torch.get_rng_state()
        atomic_save(Path(path), tensors, {"step": str(step), "extra": json.dumps(extra)})
    ctx.barrier()


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    check: Optional[Callable[[dict], None]] = None, restore_rng: bool = False,
                    log: Optional[Callable[[str], None]] = None) -> tuple[int, dict]:
    """(step, extra) of a checkpoint, its checksum verified (CheckpointError names a corrupt file), after loading
    its weights into `model` and, given one, its moments into `optimizer`. `check(extra)` may refuse the file
    before anything is loaded; `restore_rng` (resuming a run) puts back the torch RNG state it was saved with."""
    tensors, meta = read_checkpoint(Path(path), log=log)
    extra = json.loads(meta.get("extra", "{}"))
    if check is not None:
        check(extra)
    load_train_state(model, optimizer, tensors, where=str(path))
    if restore_rng and "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    return int(meta["step"]), extra


# ------------------------------------------------------------------------------------------- training data

def _image_key(image) -> bytes:
    """Cheap identity of an image source: a file by path and size, embedded bytes and data: URIs by content."""
    if isinstance(image, (str, os.PathLike)):
        text = str(image)
        if not text.startswith("data:"):
            try:
                return f"file:{text}:{os.stat(text).st_size}".encode()
            except OSError:
                return f"file:{text}:?".encode()
        return hashlib.sha256(text.encode()).digest()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(image).digest()
    if hasattr(image, "tobytes") and hasattr(image, "size"):  # a PIL image
        return hashlib.sha256(f"{image.mode}:{image.size}".encode() + image.tobytes()).digest()
    return repr(image).encode()


def data_fingerprint(examples) -> str:
    """A sha256 over the examples' text and images (see `_image_key`), so a resume on other data of the same
    length is refused. The text is encoded in one json.dumps call (per-example calls cost more than the hashing)."""
    texts = [[ex.kind, ex.turns, ex.caption, ex.pieces, len(ex.images)] for ex in examples]
    h = hashlib.sha256(json.dumps(texts, ensure_ascii=False, default=str).encode())
    for ex in examples:
        for image in ex.images:
            h.update(_image_key(image) + b"\0")
    return h.hexdigest()
