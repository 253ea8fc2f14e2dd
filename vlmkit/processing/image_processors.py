"""Per-family image preprocessing, numerically equal to transformers' image processors (see image_ops.py for
how: same PIL resizes, then a lookup table with transformers' arithmetic).

This module: CLIP (LLaVA) and IDEFICS, and the factory. Idefics2 and Idefics3/SmolVLM (splitting, tiles, padding
masks) live in `image_tiling.py`; the operations they all share in `image_ops.py`.

Every family function takes images per prompt (a list of lists of PIL images; a flat list means one
prompt) and returns a dict: tensors under `TENSOR_KEYS`, plus plain-Python metadata (`num_images`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .image_ops import (
    ImageSettings, center_crop, convert_to_rgb, generic_output_size, nest_images, normalization_table, parallel_map,
    resize, size_dict, write_normalized,
)
from .image_tiles import MllamaImageSettings, preprocess_mllama
from .image_tiling import Idefics2ImageSettings, Idefics3ImageSettings, preprocess_idefics2, preprocess_idefics3

__all__ = [
    "TENSOR_KEYS", "ClipImageSettings", "IdeficsImageSettings", "ImageProcessor",
    "preprocess_clip", "preprocess_idefics", "image_processor_for",
]

TENSOR_KEYS = ("pixel_values", "pixel_attention_mask")  # the rest of a result dict is metadata

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------- settings


@dataclass
class ClipImageSettings(ImageSettings):
    """CLIPImageProcessor (LLaVA-1.5): resize shortest edge, center crop."""

    size: dict = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = int(Image.Resampling.BICUBIC)
    do_center_crop: bool = True
    crop_size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    _size_int_is_square = False  # CLIP's default_to_square=False: an int size is the shortest edge

    @classmethod
    def _extra_from_dict(cls, config: dict) -> dict:
        if config.get("crop_size") is None:
            return {}
        return {"crop_size": size_dict(config["crop_size"], default_to_square=True)}


@dataclass
class IdeficsImageSettings(ImageSettings):
    """IdeficsImageProcessor (IDEFICS 1): square resize to image_size, no crop."""

    size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = int(Image.Resampling.BICUBIC)
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD

    @classmethod
    def _extra_from_dict(cls, config: dict) -> dict:
        image_size = config.get("image_size")  # the legacy key wins over `size`, as in transformers
        return {"size": {"height": image_size, "width": image_size}} if image_size is not None else {}

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size["height"], self.size["width"]


# ---------------------------------------------------------------------------------------- CLIP, IDEFICS

def _resize_and_crop(image: Image.Image, s: ImageSettings) -> np.ndarray:
    """transformers' PilBackend._preprocess geometry: resize, then center crop; returns HWC uint8."""
    image = convert_to_rgb(image)  # done even when do_convert_rgb is False: the models need 3 channels
    if s.do_resize:
        image = resize(image, *generic_output_size(image.height, image.width, s.size), s.resample)
    array = np.asarray(image)
    if getattr(s, "do_center_crop", False):
        array = center_crop(array, s.crop_size["height"], s.crop_size["width"])
    return array


def _normalize_into(arrays: list[np.ndarray], out: np.ndarray, slots: list[tuple], s: ImageSettings) -> None:
    """Write each HWC uint8 array, normalized, into out[slot] (a [3, H, W] view); all must be H x W."""
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1 or (arrays and arrays[0].shape[:2] != out.shape[-2:]):
        raise ValueError(f"images end up with different sizes {sorted(shapes)}; enable center crop or a fixed size")
    table = normalization_table(s)
    parallel_map(lambda k: write_normalized(table, arrays[k], out[slots[k]]), list(range(len(arrays))))


def preprocess_clip(images, settings: ClipImageSettings) -> dict:
    """LLaVA-1.5. Returns pixel_values [N, 3, H, W] (all prompts' images in order) and num_images per prompt."""
    nested = nest_images(images)
    flat = [im for sample in nested for im in sample]
    result = {"num_images": [len(sample) for sample in nested]}
    if flat:
        arrays = parallel_map(lambda im: _resize_and_crop(im, settings), flat)
        out = np.empty((len(arrays), 3, *arrays[0].shape[:2]), dtype=np.float32)
        _normalize_into(arrays, out, [(k,) for k in range(len(arrays))], settings)
        result["pixel_values"] = torch.from_numpy(out)
    return result


def preprocess_idefics(images, settings: IdeficsImageSettings) -> dict:
    """IDEFICS 1. Returns pixel_values [B, max(1, max_images), 3, S, S] (missing images all zero, as
    IdeficsProcessor pads them) and num_images per prompt."""
    nested = nest_images(images)
    counts = [len(sample) for sample in nested]
    flat = [im for sample in nested for im in sample]
    arrays = parallel_map(lambda im: _resize_and_crop(im, settings), flat)
    height, width = arrays[0].shape[:2] if arrays else settings.image_size  # differs only if do_resize=False
    out = np.zeros((len(nested), max(1, max(counts, default=0)), 3, height, width), dtype=np.float32)
    _normalize_into(arrays, out, [(i, j) for i, count in enumerate(counts) for j in range(count)], settings)
    return {"pixel_values": torch.from_numpy(out), "num_images": counts}


# ---------------------------------------------------------------------------------------------- factory

class ImageProcessor:
    """A family's preprocessing bound to its settings: `processor(images_per_prompt) -> dict`."""

    def __init__(self, family: str, settings: ImageSettings, function):
        self.family, self.settings, self._function = family, settings, function

    def __call__(self, images) -> dict:
        return self._function(images, self.settings)

    def __repr__(self) -> str:
        return f"ImageProcessor({self.family!r}, {self.settings!r})"


def image_processor_for(family: str, config: dict | None = None) -> ImageProcessor:
    """family: llava|clip, idefics, idefics2, idefics3|smolvlm, mllama; config: preprocessor_config.json as a dict."""
    table = {
        "llava": (ClipImageSettings, preprocess_clip),
        "clip": (ClipImageSettings, preprocess_clip),
        "idefics": (IdeficsImageSettings, preprocess_idefics),
        "idefics2": (Idefics2ImageSettings, preprocess_idefics2),
        "idefics3": (Idefics3ImageSettings, preprocess_idefics3),
        "smolvlm": (Idefics3ImageSettings, preprocess_idefics3),
        "mllama": (MllamaImageSettings, preprocess_mllama),
    }
    key = family.lower()
    if key not in table:
        raise ValueError(f"unknown image processor family {family!r}; expected one of {sorted(table)}")
    settings_cls, function = table[key]
    return ImageProcessor(key, settings_cls.from_dict(config or {}), function)
