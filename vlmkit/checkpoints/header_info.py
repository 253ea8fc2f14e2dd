"""`vlmkit info` without torch: the dict `vlmkit.api.describe` gives, computed from the folder's config and the
tensor shapes in its checkpoint headers (safetensors headers; an adapter folder's adapter.safetensors + its GGUF
language model's tensor table), each tensor put in vision / connector / cross-attention / text by the family's key
map. `import torch` alone takes about a second; this answers in a fraction of that.

It answers only where it is certain to say what describe() says, and returns None elsewhere (the caller then
asks describe()): a device other than the CPU, or "auto" where a GPU driver is present or the system is not Linux;
folders saved quantized; LLaVA-NeXT tiling and Qwen2-VL native resolution (their token counts come from torch-side
code); any tensor name the key map does not place."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional

from ..machine import DTYPE_NAMES, ITEMSIZE, cpu_dtype, cpu_flags, surely_cpu_only
from .families import UnsupportedCheckpoint
from .folder_config import (
    ADAPTER, IGNORED_SUFFIXES, CheckpointError, config_from_folder, safetensors_header, saved_quantization,
    weight_files,
)
from .gguf_header import gguf_tensor_shapes, resolve_gguf
from .keymaps import family_rules, normalize_names

# What describe() reports each part of the model as (LLaVA-NeXT's row separator counts with the connector).
PARTS = {"vision": "vision", "connector": "connector", "anyres": "connector", "text": "text", "cross": "cross"}
_BACKREF = re.compile(r"\\\\(\d)")  # a template's \N, once re.escape'd
_MLP_NORM = "MLPNORMSLOT"


def default_folder() -> Path:
    """Where the embedded default model lives (vlmkit/weights/default), as vlmkit.api.default_model_path says."""
    return Path(__file__).parent.parent / "weights" / "default"


def describe_from_headers(path_or_name="default", dtype=None, device=None) -> Optional[dict]:
    """vlmkit.api.describe(path_or_name, dtype, device) without importing torch, or None where it cannot be sure."""
    dtype = _certain_dtype(dtype, device)
    folder = default_folder() if str(path_or_name) == "default" else Path(path_or_name).expanduser()
    if dtype is None or not (folder / "config.json").is_file():
        return None
    try:
        cfg, family, hf = config_from_folder(folder)
        if saved_quantization(folder) or cfg.anyres is not None or cfg.vision.flavour == "qwen2_vl":
            return None
        counts = _adapter_counts(folder, cfg, hf) if (folder / ADAPTER).is_file() else _folder_counts(folder, cfg, family)
    except (CheckpointError, UnsupportedCheckpoint, OSError, ValueError, KeyError):
        return None  # describe() names the problem
    if counts is None:
        return None
    total, itemsize, t = sum(counts.values()), ITEMSIZE[dtype], cfg.text
    return {
        "family": cfg.extra.get("hf_architecture", cfg.family),
        "architecture": hf.get("architectures", [None])[0],
        "parameters": total,
        "vision_parameters": counts["vision"], "connector_parameters": counts["connector"],
        "cross_attention_parameters": counts["cross"], "text_parameters": counts["text"],
        "connector": cfg.connector.kind, "merge": cfg.merge, "tokens_per_image": cfg.tokens_per_image,
        "image_size": cfg.vision.image_size, "context_length": t.max_position_embeddings,
        "dtype": dtype, "device": "cpu",
        "memory_bytes": total * itemsize,
        "kv_cache_bytes_per_token": 2 * t.num_layers * t.num_kv_heads * t.head_dim * itemsize,
        "folder": str(folder),
        "quantization": None,
    }


def _certain_dtype(dtype, device) -> Optional[str]:
    """The compute dtype's name when the device is surely the CPU, else None."""
    if str(device) not in ("None", "auto", "cpu") or (str(device) != "cpu" and not surely_cpu_only()):
        return None
    if dtype is None:
        return cpu_dtype(cpu_flags())
    return DTYPE_NAMES.get(dtype) if isinstance(dtype, str) else None  # a torch dtype: torch is loaded anyway


def _folder_counts(folder: Path, cfg, family) -> Optional[Counter]:
    """Elements per part, from the safetensors headers of a Hugging Face folder."""
    shapes = {}
    for path in set(weight_files(folder).values()):
        shapes.update((name, v["shape"]) for name, v in safetensors_header(path).items())
    rules = _part_patterns(cfg, family.prefixes)
    tied_head = family.prefixes["H"] + "weight"
    cross_layers = set(cfg.cross_attn.layers) if cfg.cross_attn is not None else set()
    counts = Counter()
    for name, canonical in normalize_names(shapes, family.aliases).items():
        if name.endswith(IGNORED_SUFFIXES) or (cfg.text.tie_word_embeddings and canonical == tied_head):
            continue  # the loader skips them too
        parts = {part for pattern, part in rules if pattern.fullmatch(canonical)}
        if parts == {"text", "cross"} and cfg.family == "mllama":  # one stack: the config says which are cross
            index = int(canonical[len(family.prefixes["X"]):].split(".")[0])
            parts = {"cross" if index in cross_layers else "text"}
        if len(parts) != 1:
            return None
        counts[parts.pop()] += math.prod(shapes[name])
    return counts


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
    counts["text"] += max(rows, cfg.text.vocab_size or 0) * width + sum(math.prod(s) for s in shapes.values())
    return counts
