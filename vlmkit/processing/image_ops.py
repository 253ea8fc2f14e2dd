"""Image operations every family's preprocessing shares, numerically equal to transformers' PIL backend.

Reference: transformers 5.x, PIL backend (`*ImageProcessorPil`), which is what `AutoImageProcessor` returns
when torchvision is not installed (and, for Idefics3/SmolVLM, whenever torchvision < 0.27). Every resize
there goes uint8 array -> PIL -> `Image.resize` -> uint8, so we resize PIL images with the same filter and
get the same bytes. Rescale + normalize is then a per-channel 256-entry lookup table built with exactly
transformers' arithmetic (float64 rescale, cast to float32, float32 normalize), so results are bitwise equal.

This module: the settings base class, size arithmetic, RGB conversion, resize, center crop, the lookup table
and the thread pool. The families' preprocessing: image_processors.py (CLIP, IDEFICS, the factory) and
image_tiling.py (Idefics2, Idefics3 / SmolVLM).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
from PIL import Image

from ..checkpoints.folder_config import image_config_from_folder

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------- settings

@dataclass
class ImageSettings:
    """Fields shared by every family; names and meanings are those of preprocessor_config.json."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    size: dict = field(default_factory=dict)
    resample: int = int(Image.Resampling.BILINEAR)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = IMAGENET_STANDARD_MEAN
    image_std: tuple = IMAGENET_STANDARD_STD

    # How an int `size` in old configs is read (transformers' get_size_dict `default_to_square`).
    _size_int_is_square = True

    @classmethod
    def from_dict(cls, config: dict) -> "ImageSettings":
        """Read a preprocessor_config.json dict; missing or null keys keep the family default."""
        config = dict(config)
        values = {}
        for f in fields(cls):
            if config.get(f.name) is not None:
                values[f.name] = config[f.name]
        if "resample" in values:
            values["resample"] = int(values["resample"])
        if "size" in values:
            values["size"] = size_dict(values["size"], default_to_square=cls._size_int_is_square)
        for key in ("image_mean", "image_std"):
            if key in values:
                v = values[key]
                values[key] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        values.update(cls._extra_from_dict(config))
        return cls(**values)

    @classmethod
    def _extra_from_dict(cls, config: dict) -> dict:
        return {}


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
class Qwen2VLImageSettings(ImageSettings):
    """Qwen2VLImageProcessor (Qwen2-VL, Qwen2.5-VL): size = {shortest_edge: min_pixels, longest_edge: max_pixels};
    the legacy min_pixels / max_pixels keys win, as in transformers."""

    size: dict = field(default_factory=lambda: {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
    resample: int = int(Image.Resampling.BICUBIC)
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    _size_int_is_square = False

    @classmethod
    def _extra_from_dict(cls, config: dict) -> dict:
        size = dict(size_dict(config["size"], False)) if config.get("size") is not None else {
            "shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        for legacy, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if legacy in size:  # some hub files write {"min_pixels": ..., "max_pixels": ...} as the size
                size[key] = size.pop(legacy)
            if config.get(legacy) is not None:
                size[key] = int(config[legacy])
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ValueError(f"Qwen2-VL image size needs shortest_edge (min pixels) and longest_edge (max pixels), "
                             f"got {size}")
        return {"size": size}


def native_resolution_info(settings: Qwen2VLImageSettings) -> tuple[str, dict]:
    """(image size, tokens per image) as `VLM.info()` states them for a native-resolution (Qwen2-VL) processor:
    ranges, from its pixel bounds and patch x merge blocks."""
    block = settings.patch_size * settings.merge_size
    lo, hi = settings.size["shortest_edge"], settings.size["longest_edge"]
    tokens = {"tokens_per_image": f"{max(1, lo // block ** 2)}-{hi // block ** 2} (one per {block}x{block} px)"}
    return f"{lo:,}-{hi:,} pixels (area), sides multiples of {block} px", tokens


def native_resolution_of_folder(folder) -> tuple[str, dict]:
    """`native_resolution_info` of a Qwen2-VL folder, read from its files alone (what `vlmkit info` needs)."""
    return native_resolution_info(Qwen2VLImageSettings.from_dict(image_config_from_folder(folder)))


def size_dict(size, default_to_square: bool = True) -> dict:
    """transformers' get_size_dict: int / (h, w) / dict -> a size dict."""
    if isinstance(size, dict):
        return {k: int(v) for k, v in size.items() if v is not None}
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"cannot read image size {size!r}")


# ---------------------------------------------------------------------------------------------- helpers

def nest_images(images) -> list[list[Image.Image]]:
    """One image -> [[image]]; a flat list -> one prompt [[...]]; a list of lists unchanged (as transformers)."""
    if isinstance(images, Image.Image):
        return [[images]]
    images = list(images)
    if all(isinstance(x, (list, tuple)) for x in images) and images:
        nested = [list(x) for x in images]
    elif all(isinstance(x, Image.Image) for x in images):
        nested = [images]
    else:
        raise TypeError("expected a PIL image, a list of PIL images, or a list of lists of PIL images")
    for sample in nested:
        for x in sample:
            if not isinstance(x, Image.Image):
                raise TypeError(f"expected PIL images (load them with vlmkit.processing.images.load_image), "
                                f"got {type(x).__name__}")
    return nested


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb for PIL input: anything with alpha/transparency composited on white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, height: int, width: int, resample) -> Image.Image:
    # reducing_gap=None as in transformers; PIL copies when the size is unchanged, which is the same result.
    return image.resize((width, height), resample=Image.Resampling(int(resample)))


def generic_output_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """Target (h, w) of transformers' PilBackend.resize for each kind of size dict."""
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest and longest:
        return size_with_aspect_ratio(height, width, shortest, longest)
    if shortest:  # get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest, int(shortest * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if size.get("max_height") and size.get("max_width"):
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return int(height * scale), int(width * scale)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(f"unsupported size {size}: need height/width, max_height/max_width or shortest_edge")


def size_with_aspect_ratio(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """transformers' get_size_with_aspect_ratio (shortest edge to `size`, longest capped at `max_size`)."""
    raw_size = None
    if max_size is not None:
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * size > max_size:
            raw_size = max_size * lo / hi
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        ow = size
        oh = int(raw_size * height / width) if raw_size is not None else int(size * height / width)
        return oh, ow
    oh = size
    ow = int(raw_size * width / height) if raw_size is not None else int(size * width / height)
    return oh, ow


def center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' center_crop on an HWC uint8 array (zero padding when the image is smaller)."""
    h, w = array.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return array[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((new_h, new_w, array.shape[2]), dtype=array.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)  # ceil
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = array
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def normalization_table(s: ImageSettings) -> np.ndarray:
    """[3, 256] float32: the value transformers produces for each uint8 input, per channel.

    Same operations in the same precisions as its rescale (float64 multiply, cast to float32) and
    normalize (float32 subtract, float32 divide), so a lookup gives bitwise-identical results."""
    values = np.arange(256, dtype=np.float64)
    x = (values * s.rescale_factor).astype(np.float32) if s.do_rescale else values.astype(np.float32)
    x = np.broadcast_to(x, (3, 256))
    if s.do_normalize:
        mean = np.asarray(s.image_mean, dtype=np.float32).reshape(-1, 1)
        std = np.asarray(s.image_std, dtype=np.float32).reshape(-1, 1)
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def write_normalized(table: np.ndarray, array: np.ndarray, out: np.ndarray) -> None:
    """out[c, :h, :w] = table[c][array[..., c]] for an HWC uint8 array (vectorised, no float temporaries)."""
    h, w = array.shape[:2]
    for c in range(3):
        np.take(table[c], array[..., c], out=out[c, :h, :w], mode="clip")


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    # A forked child (e.g. a DataLoader worker) inherits the pool object but not its threads; reusing it
    # would hang, so the child starts its own.
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def parallel_map(fn, items: list) -> list:
    """Map over images with threads: PIL resampling and numpy take release the GIL."""
    global _POOL
    if len(items) <= 1:
        return [fn(x) for x in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="vlmkit-img")
    return list(_POOL.map(fn, items))
