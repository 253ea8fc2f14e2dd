"""A llama.cpp multimodal pair as a VLM: a text GGUF (Llama architecture) + an `mmproj` GGUF (vision tower and
projector, `clip.*` metadata, `v.blk.N...` names). Idefics3 / SmolVLM (projector type "idefics3") and LLaVA-1.5
("mlp": features from the last-but-one stored ViT layer, class token dropped, as llama.cpp's LLaVA graph takes them).

    text, mmproj = gguf_pair("out/")              # (gguf_header.py), or the two paths
    model = load_gguf_vlm(text, mmproj)

The config comes from the two files' metadata alone; every tensor of the mmproj must have a place in the model
(unknown or missing names are errors that name them)."""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch
from gguf.quants import dequantize

from ..config import ConnectorConfig, VisionConfig, VLMConfig
from ..models.quant import QuantSpec
from ..models.vlm import VLMModel
from .builder import TensorSource, build_model
from .folder_config import CheckpointError
from .families.common import SIGLIP
from .gguf import GGUFSource, open_gguf, read_metadata, text_config_from_metadata

SUPPORTED_PROJECTORS = ("idefics3", "mlp")

_LAYER = {"ln1": "norm1", "ln2": "norm2", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
          "attn_out": "attn.o_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
_TOP = {"v.patch_embd": "vision.patch_embed", "v.position_embd": "vision.pos_embed", "v.post_ln": "vision.post_norm",
        "v.pre_ln": "vision.pre_norm", "mm.model.fc": "connector.proj", "mm.0": "connector.fc1",
        "mm.2": "connector.fc2"}


def mmproj_state_name(name: str) -> str:
    if name == "v.class_embd":
        return "vision.class_embed"
    match = re.fullmatch(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match and match.group(2) in _LAYER:
        return f"vision.layers.{match.group(1)}.{_LAYER[match.group(2)]}.{match.group(3)}"
    match = re.fullmatch(r"([\w.]+)\.(weight|bias)", name)
    if match and match.group(1) in _TOP:
        return f"{_TOP[match.group(1)]}.{match.group(2)}"
    raise CheckpointError(f"mmproj tensor {name!r} has no place in vlmkit's model")


def projector_type(meta: dict) -> str:
    proj = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
    if proj not in SUPPORTED_PROJECTORS:
        raise CheckpointError(f"mmproj projector type {proj!r} is not supported (supported: {SUPPORTED_PROJECTORS})")
    return proj


def vision_config_from_metadata(meta: dict, names: set, text_width: int) -> tuple[VisionConfig, ConnectorConfig]:
    proj = projector_type(meta)
    if not meta.get("clip.has_vision_encoder"):
        raise CheckpointError("the mmproj file has no vision encoder (clip.has_vision_encoder)")

    def get(key):
        value = meta.get(f"clip.vision.{key}")
        if value is None:
            raise CheckpointError(f"the mmproj file lacks clip.vision.{key}")
        return value

    shape = dict(hidden_size=get("embedding_length"), intermediate_size=get("feed_forward_length"),
                 num_layers=get("block_count"), num_heads=get("attention.head_count"), patch_size=get("patch_size"),
                 image_size=get("image_size"), layer_norm_eps=get("attention.layer_norm_epsilon"))
    if proj == "mlp":  # clip.cpp: quick GELU unless use_gelu
        if "mm.2.weight" not in names or "v.class_embd" not in names:
            raise CheckpointError("only LLaVA-1.5's two-layer projector over a CLIP tower (class token) is supported")
        vision = VisionConfig(**shape, act="gelu" if meta.get("clip.use_gelu") else "quick_gelu", class_token=True,
                              patch_bias="v.patch_embd.bias" in names, pre_norm="v.pre_ln.weight" in names,
                              feature_layer=-2, drop_class_token=True)
        return vision, ConnectorConfig(kind="mlp", in_dim=vision.hidden_size, out_dim=text_width, act="gelu")
    if not meta.get("clip.use_gelu"):
        raise CheckpointError("the mmproj file's ViT is not GELU (clip.use_gelu), which idefics3 needs")
    vision = VisionConfig(**shape, act="gelu_pytorch_tanh", patch_keep_partial=True, **SIGLIP)
    connector = ConnectorConfig(kind="pixel_shuffle", in_dim=vision.hidden_size, out_dim=get("projection_dim"),
                                scale_factor=int(meta.get("clip.vision.projector.scale_factor") or 2))
    return vision, connector


def image_processor_config(meta: dict) -> dict:
    """Image-processor settings (transformers' names) from the mmproj metadata. LLaVA: CLIP's resize + center crop
    (llama.cpp pads to a square instead: the same on square images)."""
    size = int(meta["clip.vision.image_size"])
    common = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
              "image_mean": list(meta["clip.vision.image_mean"]), "image_std": list(meta["clip.vision.image_std"])}
    if projector_type(meta) == "mlp":
        return {**common, "do_resize": True, "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
                "crop_size": {"height": size, "width": size}}
    longest = int(meta.get("clip.vision.preproc_image_size") or size)
    return {**common, "do_resize": True, "size": {"longest_edge": longest}, "max_image_size": {"longest_edge": size},
            "do_image_splitting": longest > size, "resample": 1, "do_pad": True}


def processor_settings(cfg: VLMConfig) -> dict:
    """processor_config.json's part the prompt rules read (LLaVA: none, the model config supplies them)."""
    return {"image_seq_len": cfg.tokens_per_image} if cfg.family == "idefics3" else {}


class MmprojSource(TensorSource):
    """The mmproj's tensors under vlmkit's names, dequantized to float32 one at a time."""

    what = "mmproj GGUF"

    def __init__(self, reader, cfg: VLMConfig):
        self.origin = getattr(reader.data, "filename", "mmproj")
        self.tensors = {mmproj_state_name(t.name): t for t in reader.tensors}
        self.unused = {}
        if cfg.family == "llava" and "vision.post_norm.weight" not in self.tensors:
            # CLIP's post-layernorm, which LLaVA's features never pass (nor does llama.cpp): identity
            d = cfg.vision.hidden_size
            self.unused = {"vision.post_norm.weight": torch.ones(d), "vision.post_norm.bias": torch.zeros(d)}

    def keys(self, expected=None) -> list[str]:
        return list(self.tensors) + list(self.unused)

    def label(self, name: str) -> str:
        return self.tensors[name].name if name in self.tensors else name

    def read(self, name: str) -> torch.Tensor:
        if name in self.unused:
            return self.unused[name]
        t = self.tensors[name]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name].n_bytes) if name in self.tensors else 0


class PairSource(TensorSource):
    """The text GGUF and the mmproj as one source."""

    what = "GGUF pair"

    def __init__(self, text: GGUFSource, mmproj: MmprojSource):
        self.text, self.mmproj, self.origin = text, mmproj, f"{text.origin} + {mmproj.origin}"

    def keys(self, expected=None) -> list[str]:
        return self.text.keys() + self.mmproj.keys()

    def _owner(self, name):
        return self.mmproj if name in self.mmproj.tensors or name in self.mmproj.unused else self.text

    def read(self, name):
        return self._owner(name).read(name)

    def read_quantized(self, name, kind, dtype):
        return self._owner(name).read_quantized(name, kind, dtype)

    def nbytes(self, name):
        return self._owner(name).nbytes(name)


def gguf_vlm_config(text_meta: dict, text_names: set, mm_meta: dict, mm_names: set) -> VLMConfig:
    text = text_config_from_metadata(text_meta, text_names)
    vision, connector = vision_config_from_metadata(mm_meta, mm_names, text.hidden_size)
    if connector.out_dim != text.hidden_size:
        raise CheckpointError(f"the mmproj projects to {connector.out_dim} features, the text model is "
                              f"{text.hidden_size} wide: the files are not a pair")
    tokens = text_meta.get("tokenizer.ggml.tokens") or []
    if "<image>" not in tokens:
        raise CheckpointError("the text GGUF's vocabulary has no <image> token (needed for the image placeholders)")
    text.vocab_size = len(tokens)
    llava = connector.kind == "mlp"
    return VLMConfig(family="llava" if llava else "idefics3", vision=vision, connector=connector, text=text,
                     image_token_id=tokens.index("<image>"),
                     tokens_per_image=vision.grid**2 if llava else vision.grid**2 // connector.scale_factor**2)


def load_gguf_vlm(text_path, mmproj_path, dtype: Optional[torch.dtype] = None, device=None,
                  quantize: Optional[QuantSpec] = None, progress: Optional[bool] = None) -> tuple[VLMModel, dict, dict]:
    """(model, the text file's metadata, the mmproj's metadata) from a llama.cpp pair."""
    text_reader, mm_reader = open_gguf(str(text_path)), open_gguf(str(mmproj_path))
    text_meta, mm_meta = read_metadata(text_reader), read_metadata(mm_reader)
    if mm_meta.get("general.architecture") != "clip":
        raise CheckpointError(f"{mmproj_path} is not an mmproj GGUF (general.architecture "
                              f"{mm_meta.get('general.architecture')!r}, expected 'clip')")
    cfg = gguf_vlm_config(text_meta, {t.name for t in text_reader.tensors},
                          mm_meta, {t.name for t in mm_reader.tensors})
    source = PairSource(GGUFSource(text_reader, cfg.text, prefix="text.", vocab_size=cfg.text.vocab_size),
                        MmprojSource(mm_reader, cfg))
    return build_model(cfg, source, dtype, device, quantize, progress), text_meta, mm_meta
