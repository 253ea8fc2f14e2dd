"""A model folder's config.json as a VLMConfig, and safetensors headers, read without torch (so `vlmkit info` can
answer before torch would have finished importing). The loaders in hf.py, adapter.py and quantized.py use these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..config import VLMConfig
from .families import Family, family_for_architecture
from .io import read_json

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER = "adapter.safetensors"  # an adapter folder's trained tensors (vlmkit.checkpoints.adapter)
# Tensors some writers include that carry no weights of ours (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")


class CheckpointError(ValueError):
    pass


def default_model_path() -> Path:
    """The embedded default model's folder inside the package."""
    return Path(__file__).parent.parent / "weights" / "default"


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


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


def saved_quantization(folder) -> Optional[dict]:
    """The `quantization_config` of a folder written by `save_quantized`, else None."""
    qc = read_config(folder).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "vlmkit" else None


def safetensors_header(path) -> dict:
    """A safetensors file's header: tensor name -> {"dtype", "shape", "data_offsets"}, without touching the data
    (the format: an 8-byte little-endian length, then that many bytes of JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from None
    header.pop("__metadata__", None)
    return header


def weight_files(folder: Path) -> dict:
    """tensor name -> file, from the index when sharded."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        return {name: folder / shard for name, shard in index["weight_map"].items()}
    if (folder / WEIGHTS).is_file():
        return {name: folder / WEIGHTS for name in safetensors_header(folder / WEIGHTS)}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickle weights (.bin/.pt) found; vlmkit reads safetensors only")
    raise CheckpointError(f"{folder}: no {WEIGHTS} or {INDEX}")


def image_config_from_folder(folder, proc_cfg: Optional[dict] = None) -> dict:
    """A model folder's image processor settings: processor_config.json's `image_processor` section, else
    preprocessor_config.json ({} when neither has them)."""
    if proc_cfg is None:
        proc_cfg = read_json(Path(folder) / "processor_config.json")
    return proc_cfg.get("image_processor") or read_json(Path(folder) / "preprocessor_config.json")
