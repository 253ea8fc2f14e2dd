"""LLaVA-NeXT "anyres" preprocessing, numerically equal to transformers' LlavaNextImageProcessorPil.

Per image: the grid resolution of `image_grid_pinpoints` that fits it best (models/anyres.select_best_resolution),
the image resized into it keeping its aspect ratio (ceil rounding) and padded with black around the centre, cut into
crop-sized tiles row by row; before them the whole image resized to a square (the base tile). Each tile then goes
through the CLIP steps (resize shortest edge, center crop) and the shared lookup-table normalisation (image_ops.py:
every step before it works on uint8, so values are bitwise transformers').

Returns pixel_values [N, max_tiles, 3, S, S] (all prompts' images in order; images with fewer tiles padded with
zero tiles, as `do_pad`), image_sizes [N, 2] (each image's height, width after RGB conversion) and num_images per
prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..models.anyres_grid import select_best_resolution
from .image_ops import (
    ClipImageSettings, center_crop, convert_to_rgb, generic_output_size, nest_images, normalization_table, parallel_map,
    resize, write_normalized,
)

__all__ = ["LlavaNextImageSettings", "preprocess_llava_next", "anyres_tiles"]

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass
class LlavaNextImageSettings(ClipImageSettings):
    """LlavaNextImageProcessor: anyres tiles, then CLIP's resize shortest edge + center crop per tile."""

    do_pad: bool = True
    image_grid_pinpoints: list = field(default_factory=lambda: [list(p) for p in DEFAULT_PINPOINTS])

    @property
    def base_size(self) -> tuple[int, int]:
        """The whole image's square (or height x width) resize."""
        if self.size.get("height") and self.size.get("width"):
            return self.size["height"], self.size["width"]
        return self.size["shortest_edge"], self.size["shortest_edge"]

    @property
    def tile(self) -> int:
        if self.crop_size and self.crop_size.get("height"):
            return self.crop_size["height"]
        return self.size.get("height") or self.size["shortest_edge"]


def _fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """transformers' get_patch_output_size: scale to fit inside the target, the other side rounded up."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_tiles(image: Image.Image, s: LlavaNextImageSettings) -> list[np.ndarray]:
    """One RGB image -> its HWC uint8 tiles, base tile first (before the per-tile CLIP steps)."""
    target_h, target_w = select_best_resolution(image.height, image.width, s.image_grid_pinpoints)
    new_h, new_w = _fit_size(image.height, image.width, target_h, target_w)
    fitted = np.asarray(resize(image, new_h, new_w, s.resample))
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
    canvas[top:top + new_h, left:left + new_w] = fitted
    t = s.tile
    tiles = [canvas[i:i + t, j:j + t] for i in range(0, target_h, t) for j in range(0, target_w, t)]
    base = np.asarray(resize(image, *s.base_size, s.resample))
    return [base] + tiles


def _clip_steps(tile: np.ndarray, s: LlavaNextImageSettings) -> np.ndarray:
    if s.do_resize:
        h, w = generic_output_size(tile.shape[0], tile.shape[1], s.size)
        if (h, w) != tile.shape[:2]:
            tile = np.asarray(resize(Image.fromarray(tile), h, w, s.resample))
    if s.do_center_crop:
        tile = center_crop(tile, s.crop_size["height"], s.crop_size["width"])
    return tile


def _image_tiles(image: Image.Image, s: LlavaNextImageSettings) -> list[np.ndarray]:
    return [_clip_steps(t, s) for t in anyres_tiles(convert_to_rgb(image), s)]


def preprocess_llava_next(images, settings: LlavaNextImageSettings) -> dict:
    nested = nest_images(images)
    flat = [im for sample in nested for im in sample]
    result = {"num_images": [len(sample) for sample in nested], "grid_pinpoints": settings.image_grid_pinpoints}
    if not flat:
        return result
    tiles = parallel_map(lambda im: _image_tiles(im, settings), flat)
    shapes = {t.shape for image_tiles in tiles for t in image_tiles}
    if len(shapes) > 1:
        raise ValueError(f"LLaVA-NeXT tiles end up with different sizes {sorted(shapes)}; check size and crop_size")
    if not settings.do_pad and len({len(t) for t in tiles}) > 1:
        raise ValueError("images with different tile counts need do_pad=True to share one pixel_values tensor")
    h, w = tiles[0][0].shape[:2]
    out = np.zeros((len(tiles), max(len(t) for t in tiles), 3, h, w), dtype=np.float32)
    table = normalization_table(settings)
    jobs = [(i, j) for i, image_tiles in enumerate(tiles) for j in range(len(image_tiles))]
    parallel_map(lambda ij: write_normalized(table, tiles[ij[0]][ij[1]], out[ij[0], ij[1]]), jobs)
    result["pixel_values"] = torch.from_numpy(out)
    result["image_sizes"] = torch.tensor([[im.height, im.width] for im in flat], dtype=torch.long)
    return result
