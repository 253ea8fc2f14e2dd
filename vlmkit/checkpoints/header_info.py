"""`vlmkit info` without torch: the dict `vlmkit.api.describe` gives, computed from the folder's config and the
tensor shapes in its checkpoint headers (safetensors headers; an adapter folder's adapter.safetensors + its GGUF
language model's tensor table), each tensor put in vision / connector / cross-attention / text by the family's key
map. `import torch` alone takes about a second; this answers in a fraction of that.

It answers only where it is certain to say what describe() says, and returns None elsewhere (the caller then
asks describe()): a device other than the CPU, or "auto" where a GPU driver is present or the system is not Linux;
Qwen2-VL without the caller's reading of its image processor (`native_resolution`); any tensor name the key map
does not place; an adapter folder whose GGUF is not at hand. (A folder whose tensors disagree with its config does
not load; describe() reports its config, this its tensors.)"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from ..machine import DTYPE_NAMES, ITEMSIZE, cpu_dtype, cpu_flags, surely_cpu_only
from ..models.quant_layout import memory_bytes as quantized_bytes
from ..models.quant_layout import saved_weight_shape
from ..models.summary import model_info
from .families import UnsupportedCheckpoint
from .folder_config import (
    ADAPTER, IGNORED_SUFFIXES, CheckpointError, config_from_folder, default_model_path, safetensors_header,
    saved_quantization, weight_files,
)
from .gguf_header import gguf_tensor_shapes, resolve_gguf
from .keymaps import family_rules, normalize_names

# What describe() reports each part of the model as (LLaVA-NeXT's row separator counts with the connector).
PARTS = {"vision": "vision", "connector": "connector", "anyres": "connector", "text": "text", "cross": "cross"}
_BACKREF = re.compile(r"\\\\(\d)")  # a template's \N, once re.escape'd
_MLP_NORM = "MLPNORMSLOT"


def describe_from_headers(path_or_name="default", dtype=None, device=None,
                          native_resolution: Optional[Callable[[Path], tuple]] = None) -> Optional[dict]:
    """vlmkit.api.describe(path_or_name, dtype, device) without importing torch, or None where it cannot be sure.
    native_resolution: folder -> (image size, tokens per image) of a Qwen2-VL processor (the image processor's
    reading, which lives in processing/: vlmkit.processing.image_ops.native_resolution_of_folder); without it such
    folders get None."""
    dtype = _certain_dtype(dtype, device)
    folder = default_model_path() if str(path_or_name) == "default" else Path(path_or_name).expanduser()
    if dtype is None or not (folder / "config.json").is_file():
        return None
    try:
        cfg, family, hf = config_from_folder(folder)
        native = None
        if cfg.vision.flavour == "qwen2_vl":
            if native_resolution is None:
                return None
            native = native_resolution(folder)
        saved = saved_quantization(folder)
        if (folder / ADAPTER).is_file():
            counts, quantized = None if saved else _adapter_counts(folder, cfg, hf), Counter()
        else:
            counts, quantized = _folder_counts(folder, cfg, family, saved)
    except (CheckpointError, UnsupportedCheckpoint, OSError, ValueError, KeyError, TypeError):
        return None  # describe() names the problem
    if counts is None:
        return None
    total, itemsize = sum(counts.values()), ITEMSIZE[dtype]
    return model_info(cfg, total, counts, dtype=dtype, device="cpu",
                      memory_bytes=(total - quantized["elements"]) * itemsize + quantized["bytes"], itemsize=itemsize,
                      folder=folder, quantization=saved, native_resolution=native)


def _certain_dtype(dtype, device) -> Optional[str]:
    """The compute dtype's name when the device is surely the CPU, else None."""
    if str(device) not in ("None", "auto", "cpu") or (str(device) != "cpu" and not surely_cpu_only()):
        return None
    if dtype is None:
        return cpu_dtype(cpu_flags())
    return DTYPE_NAMES.get(dtype) if isinstance(dtype, str) else None  # a torch dtype: torch is loaded anyway


def _folder_counts(folder: Path, cfg, family, saved: Optional[dict]) -> tuple[Optional[Counter], Counter]:
    """Elements per part, from the safetensors headers of a Hugging Face folder; and of those, the elements and
    in-memory bytes of the layers saved quantized (`<name>.qweight/.scales(/.mins)`: `saved` names them)."""
    shapes = {}
    for path in set(weight_files(folder).values()):
        shapes.update((name, v["shape"]) for name, v in safetensors_header(path).items())
    rules = _part_patterns(cfg, family.prefixes)
    tied_head = family.prefixes["H"] + "weight"
    cross_layers = set(cfg.cross_attn.layers) if cfg.cross_attn is not None else set()
    canonical = normalize_names(shapes, family.aliases)
    by_canonical = {c: n for n, c in canonical.items()}
    counts, quantized = Counter(), Counter()
    for name, c in canonical.items():
        base, _, part = c.rpartition(".")
        if name.endswith(IGNORED_SUFFIXES) or (cfg.text.tie_word_embeddings and c == tied_head):
            continue  # the loader skips them too
        if saved and part in ("scales", "mins") and base + ".qweight" in by_canonical:
            continue  # counted with their qweight
        elements = math.prod(shapes[name])
        if saved and part == "qweight":
            kind = "int4" if base + ".mins" in by_canonical else "int8"  # embed8 is laid out as int8
            n, k = saved_weight_shape(kind, shapes[name])
            elements = n * k
            quantized.update(elements=elements, bytes=quantized_bytes(kind, n, k, saved["group_size"]), layers=1)
            c = base + ".weight"
        parts = {p for pattern, p in rules if pattern.fullmatch(c)}
        if parts == {"text", "cross"} and cfg.family == "mllama":  # one stack: the config says which are cross
            index = int(c[len(family.prefixes["X"]):].split(".")[0])
            parts = {"cross" if index in cross_layers else "text"}
        if len(parts) != 1:
            return None, quantized
        counts[parts.pop()] += elements
    if saved and quantized["layers"] != len(saved.get("modules", {})):
        return None, quantized
    return counts, quantized


def _part_patterns(cfg, prefixes: dict) -> list:
    """(compiled HF-name pattern, part) for each rule of the family's key map: the rule's template read backwards."""
    names = {"MLP_NORM": _MLP_NORM, "LINEAR": "linear_1", **prefixes}
    out = []
    for ours, template in family_rules(cfg.connector.kind, prefixes, cfg):
        groups = _groups(ours)  # \N in the template stands for what the rule's group N matched
        pattern = _BACKREF.sub(lambda m: groups[int(m.group(1)) - 1],
                               re.escape(template.format(**names)))
        pattern = pattern.replace(_MLP_NORM, "(?:pre_feedforward_layernorm|post_attention_layernorm)")
        part = "cross" if ours.startswith(r"text\.cross_blocks") else ours.split("\\")[0]
        out.append((re.compile(pattern), PARTS[part]))
    return out


def _groups(pattern: str) -> list[str]:
    """The capturing groups of a regex, as written, in the order of their numbers."""
    groups, opened, i = [], [], 0
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 1
        elif pattern[i] == "(":
            capturing = not pattern.startswith("(?", i)
            opened.append((i, len(groups) if capturing else None))
            groups += [""] if capturing else []
        elif pattern[i] == ")":
            start, index = opened.pop()
            if index is not None:
                groups[index] = pattern[start : i + 1]
        i += 1
    return groups


def _adapter_counts(folder: Path, cfg, hf: dict) -> Optional[Counter]:
    """Elements per part of an adapter folder: its trained tensors (our names) + the GGUF language model's."""
    meta = hf.get("vlmkit_adapter")
    if not meta:
        return None
    counts = Counter()
    for name, v in safetensors_header(folder / ADAPTER).items():
        if ".lora_" in name:
            continue  # merged into the weights they adapt
        part = "cross" if name.startswith("text.cross_blocks.") else name.split(".")[0]
        if part not in PARTS or part == "text":
            return None  # trained text tensors replace GGUF ones: the slow path sorts that out
        counts[PARTS[part]] += math.prod(v["shape"])
    shapes = gguf_tensor_shapes(resolve_gguf(meta["base_gguf"]))
    if cfg.text.tie_word_embeddings == ("output.weight" in shapes):
        return None  # the file and the config disagree on the head: the load fails, describe() says the config
    rows, width = shapes.pop("token_embd.weight")
    if not cfg.text.vocab_size or rows > cfg.text.vocab_size:
        return None  # the table is grown to the config's vocabulary, never cut: such a pair does not load
    counts["text"] += cfg.text.vocab_size * width + sum(math.prod(s) for s in shapes.values())
    return counts
