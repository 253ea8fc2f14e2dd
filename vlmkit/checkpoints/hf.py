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
from ..models.vlm import VLMModel
from .families import FAMILIES, Family, family_for_architecture
from .io import atomic_write
from .keymaps import build_key_map, normalize_names

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Tensors some writers include that carry no weights of ours (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")


class CheckpointError(ValueError):
    pass


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def weight_files(folder: Path) -> dict:
    """tensor name -> file, from the index when sharded."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        return {name: folder / shard for name, shard in index["weight_map"].items()}
    if (folder / WEIGHTS).is_file():
        with safe_open(folder / WEIGHTS, "pt") as f:
            return {name: folder / WEIGHTS for name in f.keys()}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickle weights (.bin/.pt) found; vlmkit reads safetensors only")
    raise CheckpointError(f"{folder}: no {WEIGHTS} or {INDEX}")


def config_from_folder(folder) -> tuple[VLMConfig, Family, dict]:
    hf = read_config(folder)
    family = family_for_architecture(hf)
    try:
        cfg = family.from_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"{folder}/config.json: {family.name} config lacks the field {e}") from None
    cfg.extra["hf_config"] = hf
    cfg.extra["hf_architecture"] = family.name
    return cfg, family, hf


def load_model(folder, dtype: Optional[torch.dtype] = None, device=None) -> VLMModel:
    folder = Path(folder)
    files = weight_files(folder)
    cfg, family, _ = config_from_folder(folder)
    with torch.device("meta"):
        model = VLMModel(cfg)
    ours = model.state_dict()
    key_map = build_key_map(ours, cfg.connector.kind, family.prefixes)
    canonical = normalize_names(files, family.aliases)  # file name -> canonical HF name
    by_canonical = {c: n for n, c in canonical.items()}
    wanted = {hf: ours_key for ours_key, hf in key_map.items()}

    missing = [hf for hf in wanted if hf not in by_canonical]
    unexpected = [
        n for n, c in canonical.items() if c not in wanted and not n.endswith(IGNORED_SUFFIXES)
        and not (cfg.text.tie_word_embeddings and c.startswith(family.prefixes["H"]))
    ]
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: checkpoint does not match the {family.name} layout: "
            f"missing {sorted(missing)[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
            f"unexpected {sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )
    state, bad_shapes, handles = {}, [], {}
    try:
        for hf_name, our_name in wanted.items():
            file_name = by_canonical[hf_name]
            path = files[file_name]
            if path not in handles:
                handles[path] = safe_open(path, "pt", device="cpu")  # memory-mapped
            t = handles[path].get_tensor(file_name)
            if tuple(t.shape) != tuple(ours[our_name].shape):
                bad_shapes.append(f"{file_name}: {tuple(t.shape)} != expected {tuple(ours[our_name].shape)}")
                continue
            target = dtype if dtype is not None else t.dtype
            state[our_name] = t.to(dtype=target) if t.is_floating_point() else t
    finally:
        handles.clear()
    if bad_shapes:
        raise CheckpointError(f"{folder}: mis-shaped tensors: " + "; ".join(bad_shapes[:20]))
    model.load_state_dict(state, strict=True, assign=True)
    model.text.reset_buffers()
    if device is not None:
        model.to(device)
    return model.eval()




def hf_config_for(cfg: VLMConfig) -> dict:
    """The original config.json when the model was loaded from one (lossless round trip), else a fresh one."""
    if "hf_config" in cfg.extra:
        # an adapter folder's pointer to its GGUF base does not apply to the full folder written here
        return {k: v for k, v in cfg.extra["hf_config"].items() if k != "vlmkit_adapter"}
    return FAMILIES[cfg.family].to_hf(cfg)


def save_model(model: VLMModel, folder, max_shard_bytes: int = 5 * 2**30) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    family = FAMILIES[cfg.extra.get("hf_architecture", cfg.family)]
    state = model.state_dict()
    key_map = build_key_map(state, cfg.connector.kind, family.prefixes)
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
