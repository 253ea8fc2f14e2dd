"""Per-family image preprocessing, numerically equal to transformers' image processors (see image_ops.py for
how: same PIL resizes, then a lookup table with transformers' arithmetic).

This module: CLIP (LLaVA), IDEFICS, Qwen2-VL (smart resize, flat patches), Gemma 3 / PaliGemma (square resize,
pan-and-scan), and the factory. Idefics2 and Idefics3/SmolVLM (splitting, tiles, padding masks) live in
`image_tiling.py`, LLaVA-NeXT's tiles in `anyres.py`, Llama 3.2 Vision's in `image_tiles.py`; the operations they
all share in `image_ops.py`.

Every family function takes images per prompt (a list of lists of PIL images; a flat list means one
prompt) and returns a dict: tensors under `TENSOR_KEYS`, plus plain-Python metadata (`num_images`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .anyres import LlavaNextImageSettings, preprocess_llava_next
from .image_ops import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipImageSettings, ImageSettings, Qwen2VLImageSettings, center_crop,
    convert_to_rgb, generic_output_size, nest_images, normalization_table, parallel_map, resize, write_normalized,
)
from .image_tiles import MllamaImageSettings, preprocess_mllama
from .image_tiling import Idefics2ImageSettings, Idefics3ImageSettings, preprocess_idefics2, preprocess_idefics3

__all__ = [
    "TENSOR_KEYS", "ClipImageSettings", "IdeficsImageSettings", "ImageProcessor",
    "preprocess_clip", "preprocess_idefics", "image_processor_for", "Qwen2VLImageSettings", "preprocess_qwen2_vl",
    "smart_resize", "Gemma3ImageSettings", "SiglipImageSettings", "preprocess_square",
]

TENSOR_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes")  # the rest is metadata


# --------------------------------------------------------------------------------------------- settings


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


# ---------------------------------------------------------------------------------------------- Qwen2-VL

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL smart_resize: sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {width}x{height} px: the aspect ratio must be below 200 for Qwen2-VL")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _qwen_patches(image: Image.Image, s: Qwen2VLImageSettings, table) -> tuple[np.ndarray, list]:
    p, m, t = s.patch_size, s.merge_size, s.temporal_patch_size
    image = convert_to_rgb(image)
    if s.do_resize:
        h, w = smart_resize(image.height, image.width, p * m, s.size["shortest_edge"], s.size["longest_edge"])
        image = resize(image, h, w, s.resample)
    array = np.asarray(image)
    h, w = array.shape[:2]
    if h % (p * m) or w % (p * m):
        raise ValueError(f"an image of {w}x{h} px does not split into {p * m} px blocks (enable do_resize)")
    chw = np.empty((3, h, w), dtype=np.float32)
    write_normalized(table, array, chw)
    gh, gw = h // p, w // p
    # [C, gh/m, m, p, gw/m, m, p] -> [gh/m, gw/m, m, m, C, p, p]: each merge block's patches contiguous
    x = chw.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # a still image fills every frame
    return x.reshape(gh * gw, 3 * t * p * p), [1, gh, gw]


def preprocess_qwen2_vl(images, settings: Qwen2VLImageSettings) -> dict:
    """Qwen2-VL. Returns pixel_values [all patches, 3 * T * p * p] (all prompts' images in order), image_grid_thw
    [N, 3] (1, rows, cols of patches) and num_images per prompt."""
    nested = nest_images(images)
    flat = [im for sample in nested for im in sample]
    result = {"num_images": [len(sample) for sample in nested]}
    if flat:
        table = normalization_table(settings)
        done = parallel_map(lambda im: _qwen_patches(im, settings, table), flat)
        result["pixel_values"] = torch.from_numpy(np.concatenate([d[0] for d in done]))
        result["image_grid_thw"] = torch.tensor([d[1] for d in done], dtype=torch.long)
    return result


# ------------------------------------------------------------------------------------- Gemma 3, PaliGemma

@dataclass
class SiglipImageSettings(ImageSettings):
    """SiglipImageProcessor (PaliGemma): square resize, bicubic, mean/std 0.5."""

    size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = int(Image.Resampling.BICUBIC)


@dataclass
class Gemma3ImageSettings(ImageSettings):
    """Gemma3ImageProcessor: square resize, bilinear, mean/std 0.5; pan-and-scan crops of elongated images."""

    size: dict = field(default_factory=lambda: {"height": 896, "width": 896})
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2


def pan_and_scan(array: np.ndarray, s: Gemma3ImageSettings) -> list[np.ndarray]:
    """transformers' Gemma3 pan_and_scan on an HWC array: 2..max crops along the long side, or none."""
    height, width = array.shape[:2]
    long, short = (width, height) if width >= height else (height, width)
    if long / short < s.pan_and_scan_min_ratio_to_activate:
        return []
    n = min(int(math.floor(long / short + 0.5)), int(math.floor(long / s.pan_and_scan_min_crop_size)))
    n = min(s.pan_and_scan_max_num_crops, max(2, n))
    cols, rows = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = int(math.ceil(width / cols)), int(math.ceil(height / rows))
    if min(crop_w, crop_h) < s.pan_and_scan_min_crop_size:
        return []
    return [array[r * crop_h:(r + 1) * crop_h, c * crop_w:(c + 1) * crop_w] for r in range(rows) for c in range(cols)]


def preprocess_square(images, settings) -> dict:
    """Gemma 3 and PaliGemma: every image (Gemma 3 with pan-and-scan: the image, then its crops) resized to
    size and normalized. Returns pixel_values [N, 3, H, W] over all prompts in order, num_images per prompt,
    num_crops per image and slots (images + crops) per prompt."""
    nested = nest_images(images)
    result = {"num_images": [len(sample) for sample in nested], "num_crops": [], "slots": []}
    arrays = []
    for sample in nested:
        count = 0
        for image in sample:
            array = np.asarray(convert_to_rgb(image))
            crops = pan_and_scan(array, settings) if getattr(settings, "do_pan_and_scan", False) else []
            result["num_crops"].append(len(crops))
            arrays += [array] + crops
            count += 1 + len(crops)
        result["slots"].append(count)
    if arrays:
        h, w = settings.size["height"], settings.size["width"]

        def prepare(a: np.ndarray) -> np.ndarray:
            image = Image.fromarray(a)
            return np.asarray(resize(image, h, w, settings.resample)) if settings.do_resize else a

        resized = parallel_map(prepare, arrays)
        out = np.empty((len(resized), 3, *resized[0].shape[:2]), dtype=np.float32)
        _normalize_into(resized, out, [(k,) for k in range(len(resized))], settings)
        result["pixel_values"] = torch.from_numpy(out)
    return result


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
        "llava_next": (LlavaNextImageSettings, preprocess_llava_next),
        "idefics2": (Idefics2ImageSettings, preprocess_idefics2),
        "idefics3": (Idefics3ImageSettings, preprocess_idefics3),
        "smolvlm": (Idefics3ImageSettings, preprocess_idefics3),
        "qwen2_vl": (Qwen2VLImageSettings, preprocess_qwen2_vl),
        "qwen2_5_vl": (Qwen2VLImageSettings, preprocess_qwen2_vl),
        "gemma3": (Gemma3ImageSettings, preprocess_square),
        "paligemma": (SiglipImageSettings, preprocess_square),
        "mllama": (MllamaImageSettings, preprocess_mllama),
    }
    key = family.lower()
    if key not in table:
        raise ValueError(f"unknown image processor family {family!r}; expected one of {sorted(table)}")
    settings_cls, function = table[key]
    return ImageProcessor(key, settings_cls.from_dict(config or {}), function)
