"""Checkpoint files, for both training loops: written atomically (temp file, fsync, rename) with a sha256 of their
content stored inside them, verified when read back (safetensors itself has no checksum, so flipped bytes would
otherwise load as silently wrong weights); temp files a crash left behind are removed when a run starts.

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

from ..checkpoints.io import atomic_write, temp_files

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
