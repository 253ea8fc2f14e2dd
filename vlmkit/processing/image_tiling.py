"""Idefics2 and Idefics3 / SmolVLM preprocessing: image splitting, tiles, padding with pixel masks.

Mirrors transformers' Idefics2ImageProcessorPil / Idefics3ImageProcessorPil / SmolVLMImageProcessorPil
(SmolVLM's is a verbatim copy of Idefics3's). Geometry (resizes, crops, tiles) is done on PIL / uint8 arrays
exactly as the reference does; values go through the shared lookup table (see image_ops.py).

Output of both: pixel_values [B, max_slots, 3, H, W] float32 and pixel_attention_mask [B, max_slots, H, W]
int64 (1 = real pixel), H, W = the largest slot in the batch; unused slots and padding are 0 in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .image_ops import (
    ImageSettings, convert_to_rgb, nest_images, normalization_table, parallel_map, resize, write_normalized,
)

__all__ = [
    "Idefics2ImageSettings", "Idefics3ImageSettings", "preprocess_idefics2", "preprocess_idefics3",
    "idefics3_tile_grid",
]

MAX_IMAGE_SIZE = 4096  # Idefics3: absolute cap on the longest edge after the first resize


@dataclass
class Idefics2ImageSettings(ImageSettings):
    size: dict = field(default_factory=lambda: {"shortest_edge": 378, "longest_edge": 980})
    resample: int = int(Image.Resampling.BILINEAR)
    do_pad: bool = True
    do_image_splitting: bool = False


@dataclass
class Idefics3ImageSettings(ImageSettings):
    size: dict = field(default_factory=lambda: {"longest_edge": 4 * 364})
    max_image_size: dict = field(default_factory=lambda: {"longest_edge": 364})  # tile side
    resample: int = int(Image.Resampling.LANCZOS)
    do_pad: bool = True
    do_image_splitting: bool = True

    @property
    def tile_size(self) -> int:
        return int(self.max_image_size["longest_edge"])


# --------------------------------------------------------------------------------------------- Idefics2

def idefics2_output_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """transformers' Idefics2 rule: cap the longest edge (int truncation), then raise EACH edge to at least
    shortest_edge independently (so small images are stretched, not scaled with their aspect ratio)."""
    if size.get("shortest_edge") and size.get("longest_edge"):
        min_len = size["shortest_edge"]
        height, width = _scale_below(height, width, size["longest_edge"])
        return max(height, min_len), max(width, min_len)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError("Idefics2 size needs shortest_edge and longest_edge, or height and width")


def _idefics2_crops(image: Image.Image, s: Idefics2ImageSettings) -> list[np.ndarray]:
    image = convert_to_rgb(image)
    if s.do_image_splitting:
        # Order: top-left, top-right, bottom-left, bottom-right, then the whole image (split BEFORE resizing;
        # each crop is then resized on its own by the shortest/longest-edge rule).
        w, h = image.size
        mid_w, mid_h = w // 2, h // 2
        boxes = [(0, 0, mid_w, mid_h), (mid_w, 0, w, mid_h), (0, mid_h, mid_w, h), (mid_w, mid_h, w, h)]
        crops = [image.crop(box) for box in boxes] + [image]
    else:
        crops = [image]
    if s.do_resize:
        crops = [resize(c, *idefics2_output_size(c.height, c.width, s.size), s.resample) for c in crops]
    return [np.asarray(c) for c in crops]


def preprocess_idefics2(images, settings: Idefics2ImageSettings) -> dict:
    """Idefics2. Returns pixel_values [B, M, 3, H, W], pixel_attention_mask [B, M, H, W] (when do_pad),
    num_images per prompt, and crops_per_image (5 with splitting: 4 quadrants then the whole image; else 1).
    M = the most slots any prompt uses (images x crops)."""
    nested = nest_images(images)
    crops = _map_nested(lambda im: _idefics2_crops(im, settings), nested)
    result = _pad_and_normalize(crops, settings)
    result["num_images"] = [len(sample) for sample in nested]
    result["crops_per_image"] = [[len(c) for c in sample] for sample in crops]
    return result


# --------------------------------------------------------------------------------------------- Idefics3

def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    # transformers' _resize_output_size_rescale_to_max_len: the longest edge BECOMES max_len (up or down),
    # the other edge is truncated and bumped to an even number.
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect_ratio)
        width += width % 2
    return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def idefics3_first_resize(height: int, width: int, size: dict) -> tuple[int, int]:
    if size.get("longest_edge"):
        return _scale_below(*_rescale_to_max_len(height, width, size["longest_edge"]), MAX_IMAGE_SIZE)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError("Idefics3 size needs longest_edge, or height and width")


def idefics3_multiple_of_tile(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder: both edges rounded UP to multiples of the tile side."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


def idefics3_tile_grid(height: int, width: int, settings: Idefics3ImageSettings) -> tuple[int, int]:
    """(rows, cols) of tiles an image of this size gets; (0, 0) = a single image, no tiles, no global image.

    Follows the actual processing path (not transformers' get_number_of_image_patches, which can disagree
    when size.longest_edge is not a multiple of the tile side)."""
    if not settings.do_image_splitting:
        return 0, 0
    if settings.do_resize:
        height, width = idefics3_first_resize(height, width, settings.size)
    tile = settings.tile_size
    height, width = idefics3_multiple_of_tile(height, width, tile)
    if height > tile or width > tile:
        return height // tile, width // tile
    return 0, 0


def _idefics3_tiles(image: Image.Image, s: Idefics3ImageSettings) -> tuple[list[np.ndarray], int, int]:
    image = convert_to_rgb(image)
    if s.do_resize:
        image = resize(image, *idefics3_first_resize(image.height, image.width, s.size), s.resample)
    tile = s.tile_size
    if not s.do_image_splitting:
        return [np.asarray(resize(image, tile, tile, s.resample))], 0, 0
    image = resize(image, *idefics3_multiple_of_tile(image.height, image.width, tile), s.resample)
    if image.height <= tile and image.width <= tile:
        return [np.asarray(image)], 0, 0
    # Tiles row-major (row 0: col 0, 1, ...), then the global image: the resized image resized again to
    # tile x tile (from the already-resized image, as the reference does).
    rows, cols = image.height // tile, image.width // tile
    array = np.asarray(image)
    tiles = [array[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    tiles.append(np.asarray(resize(image, tile, tile, s.resample)))
    return tiles, rows, cols


def preprocess_idefics3(images, settings: Idefics3ImageSettings) -> dict:
    """Idefics3 / SmolVLM. Returns pixel_values [B, M, 3, H, W], pixel_attention_mask [B, M, H, W] (when
    do_pad), num_images, crops_per_image (rows*cols + 1, or 1), and image_rows / image_cols per prompt per
    image (0, 0 when the image was not split), which the prompt expansion needs."""
    nested = nest_images(images)
    per_image = _map_nested(lambda im: _idefics3_tiles(im, settings), nested)
    result = _pad_and_normalize([[t for t, _, _ in sample] for sample in per_image], settings)
    result["num_images"] = [len(sample) for sample in nested]
    result["crops_per_image"] = [[len(t) for t, _, _ in sample] for sample in per_image]
    result["image_rows"] = [[r for _, r, _ in sample] for sample in per_image]
    result["image_cols"] = [[c for _, _, c in sample] for sample in per_image]
    return result


# ------------------------------------------------------------------------------------------------ shared

def _map_nested(fn, nested: list[list]) -> list[list]:
    flat = parallel_map(fn, [x for sample in nested for x in sample])
    out, start = [], 0
    for sample in nested:
        out.append(flat[start:start + len(sample)])
        start += len(sample)
    return out


def _pad_and_normalize(crops: list[list[list[np.ndarray]]], s) -> dict:
    """crops[prompt][image] = list of HWC uint8 arrays -> padded, normalized tensors (+ mask)."""
    slots = [[a for image_crops in sample for a in image_crops] for sample in crops]
    arrays = [a for sample in slots for a in sample]
    if not arrays:
        return {}
    max_slots = max(len(sample) for sample in slots)
    max_h = max(a.shape[0] for a in arrays)
    max_w = max(a.shape[1] for a in arrays)
    if not s.do_pad and (len({a.shape for a in arrays}) > 1 or any(len(x) != max_slots for x in slots)):
        raise ValueError("do_pad is False but images/prompts differ in size or count; cannot stack them")
    pixel_values = np.zeros((len(slots), max_slots, 3, max_h, max_w), dtype=np.float32)
    mask = np.zeros((len(slots), max_slots, max_h, max_w), dtype=np.int64)
    table = normalization_table(s)
    jobs = [(i, j, a) for i, sample in enumerate(slots) for j, a in enumerate(sample)]

    def fill(job):
        i, j, a = job
        write_normalized(table, a, pixel_values[i, j])
        mask[i, j, :a.shape[0], :a.shape[1]] = 1

    parallel_map(fill, jobs)
    result = {"pixel_values": torch.from_numpy(pixel_values)}
    if s.do_pad:
        result["pixel_attention_mask"] = torch.from_numpy(mask)
    return result
