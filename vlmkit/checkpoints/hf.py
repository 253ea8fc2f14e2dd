"""Hugging Face folders: config.json + model.safetensors (or a sharded index), read memory-mapped, written
atomically. Tensors go through the family's explicit key map; anything missing, unexpected or mis-shaped is
an error that names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import VLMConfig
from ..models.quant import BUILDERS, QuantSpec
from ..models.vlm import VLMModel
from .builder import TensorSource, build_model
from .families import FAMILIES
from .folder_config import (
    IGNORED_SUFFIXES, INDEX, WEIGHTS, CheckpointError, config_from_folder, safetensors_header, weight_files,
)
from .io import atomic_write
from .keymaps import build_key_map, normalize_names

class SafetensorsSource(TensorSource):
    """A Hugging Face folder's safetensors (one file or a sharded index), memory-mapped, through the family's key
    map. `packed`: modules stored quantized by vlmkit (name -> kind), read as `<name>.qweight/.scales(/.mins)`."""

    def __init__(self, folder, packed: Optional[dict] = None, group_size: Optional[int] = None):
        self.origin = folder = Path(folder)
        self.files = weight_files(folder)  # first: a folder of pickles is refused before its config is read
        self.cfg, self.family, self.hf = config_from_folder(folder)
        self.packed, self.group_size = packed or {}, group_size
        self.handles, self.where, self.sizes = {}, {}, {}

    def keys(self, expected: dict) -> list[str]:
        family, cfg = self.family, self.cfg
        key_map = build_key_map(expected, cfg.connector.kind, family.prefixes, cfg)
        canonical = normalize_names(self.files, family.aliases)  # file name -> canonical HF name
        by_canonical = {c: n for n, c in canonical.items()}
        wanted = {}  # canonical HF name -> our name
        for ours, hf_name in key_map.items():
            module = ours.rpartition(".")[0]
            if module in self.packed and ours.endswith(".weight"):
                base = hf_name[: -len("weight")]
                wanted.update({base + part: ours for part in BUILDERS[self.packed[module]].parts})
            else:
                wanted[hf_name] = ours
        missing = [hf for hf in wanted if hf not in by_canonical]
        unexpected = [
            n for n, c in canonical.items() if c not in wanted and not n.endswith(IGNORED_SUFFIXES)
            and not (cfg.text.tie_word_embeddings and c.startswith(family.prefixes["H"]))
        ]
        if missing or unexpected:
            raise CheckpointError(
                f"{self.origin}: checkpoint does not match the {family.name} layout: "
                f"missing {sorted(missing)[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
                f"unexpected {sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
            )
        for hf_name, ours in wanted.items():
            self.where.setdefault(ours, {})[hf_name.rpartition(".")[2]] = by_canonical[hf_name]
        return list(key_map)

    def _get(self, file_name: str) -> torch.Tensor:
        path = self.files[file_name]
        if path not in self.handles:
            self.handles[path] = safe_open(path, "pt", device="cpu")  # memory-mapped
        return self.handles[path].get_tensor(file_name)

    def read(self, name: str) -> torch.Tensor:
        (file_name,) = self.where[name].values()
        return self._get(file_name)

    def read_quantized(self, name: str, kind: str, dtype: torch.dtype):
        module = name.rpartition(".")[0]
        if module not in self.packed:
            return None
        parts = {part: self._get(file_name) for part, file_name in self.where[name].items()}
        return BUILDERS[kind].from_export(parts, None, dtype, self.group_size)

    def nbytes(self, name: str) -> int:
        if not self.sizes:
            for path in set(self.files.values()):
                self.sizes.update((k, v["data_offsets"][1] - v["data_offsets"][0])
                                  for k, v in safetensors_header(path).items())
        return sum(self.sizes[file_name] for file_name in self.where[name].values())

    def label(self, name: str) -> str:
        return ", ".join(self.where[name].values())

    def close(self) -> None:
        self.handles.clear()


def load_model(folder, dtype: Optional[torch.dtype] = None, device=None,
               quantize: Optional[QuantSpec] = None, progress: Optional[bool] = None) -> VLMModel:
    """A Hugging Face folder as a VLMModel (floats as stored unless `dtype`; quantized as it loads with `quantize`;
    progress: the load's bar on stderr, see builder.progress_enabled)."""
    source = SafetensorsSource(folder)
    return build_model(source.cfg, source, dtype, device, quantize, progress)


def hf_config_for(cfg: VLMConfig) -> dict:
    """The original config.json when the model was loaded from one (lossless round trip), else a fresh one."""
    if "hf_config" in cfg.extra:
        # an adapter folder's pointer to its GGUF base does not apply to the full folder written here
        return {k: v for k, v in cfg.extra["hf_config"].items() if k != "vlmkit_adapter"}
    return FAMILIES[cfg.extra.get("hf_architecture", cfg.family)].to_hf(cfg)  # e.g. SmolVLM, Qwen2.5-VL


def save_model(model: VLMModel, folder, max_shard_bytes: int = 5 * 2**30) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    family = FAMILIES[cfg.extra.get("hf_architecture", cfg.family)]
    state = model.state_dict()
    key_map = build_key_map(state, cfg.connector.kind, family.prefixes, cfg)
    tensors = {key_map[k]: v.detach().contiguous().cpu() for k, v in state.items()}
    hf = dict(hf_config_for(cfg))
    hf["dtype"] = str(model.dtype).removeprefix("torch.")
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(hf, indent=2)))

    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(folder / WEIGHTS, lambda p: save_file(shards[0], p, metadata=meta))
        (folder / INDEX).unlink(missing_ok=True)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(folder / name, lambda p, s=shard: save_file(s, p, metadata=meta))
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(folder / INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    (folder / WEIGHTS).unlink(missing_ok=True)
