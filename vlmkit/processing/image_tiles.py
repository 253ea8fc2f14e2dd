"""Mllama (Llama 3.2 Vision) image tiling, equal to transformers' `MllamaImageProcessorPil`: each image is resized
into the best canvas of whole tiles (at most max_image_tiles), padded with zeros bottom/right (before normalizing,
so padding is the normalized 0), cut into tiles in row order, and packed as
  pixel_values [B, M, max_image_tiles, 3, S, S] (missing tiles and images all zero),
  aspect_ratio_ids [B, M] (1 + the arrangement's index in the supported list; 0 = no image),
  aspect_ratio_mask [B, M, max_image_tiles] (1 = a real tile; tile 0 is always 1), num_tiles per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from .image_ops import ImageSettings, convert_to_rgb, nest_images, normalization_table, parallel_map, resize

__all__ = ["MllamaImageSettings", "preprocess_mllama", "supported_aspect_ratios", "tiled_canvas"]


@dataclass
class MllamaImageSettings(ImageSettings):
    size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = int(Image.Resampling.BILINEAR)
    max_image_tiles: int = 4

    def __post_init__(self):
        if self.size.get("height") is None or self.size.get("height") != self.size.get("width"):
            raise ValueError(f"Mllama image size must be square {{'height': S, 'width': S}}, got {self.size}")
        if not isinstance(self.max_image_tiles, int) or self.max_image_tiles <= 0:
            raise ValueError(f"max_image_tiles must be a positive integer, got {self.max_image_tiles!r}")

    @classmethod
    def _extra_from_dict(cls, config: dict) -> dict:
        if config.get("do_resize") is False or config.get("do_pad") is False:
            raise ValueError("Mllama preprocessing always resizes and pads (do_resize / do_pad false is refused)")
        return {}


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple:
    """Tile arrangements (a, b) with a * b <= max_tiles, in transformers' order; an image's aspect_ratio_id is its
    arrangement's index + 1."""
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


@lru_cache(maxsize=256)
def tiled_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The canvas (h, w) in whole tiles: the smallest upscale when one fits, else the mildest downscale; ties go
    to the smaller area (transformers' get_optimal_tiled_canvas, an arrangement (a, b) being a rows x b columns)."""
    canvases = [(a * tile, b * tile) for a, b in supported_aspect_ratios(max_tiles)]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(s for s in scales if s < 1)
    candidates = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda c: c[0] * c[1])  # min keeps the first of equal areas, as argmin


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The resized (h, w) inside the canvas, aspect ratio kept (transformers' get_image_size_fit_to_canvas)."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _tiles(image: Image.Image, s: MllamaImageSettings, table: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> (tiles [n, 3, S, S] float32, (rows, columns))."""
    image = convert_to_rgb(image)
    tile = s.size["height"]
    canvas_h, canvas_w = tiled_canvas(image.height, image.width, s.max_image_tiles, tile)
    h, w = fit_to_canvas(image.height, image.width, canvas_h, canvas_w, tile)
    array = np.asarray(resize(image, h, w, s.resample))
    padded = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)  # zero pixels, normalized like any other
    padded[:h, :w] = array
    out = np.empty((3, canvas_h, canvas_w), dtype=np.float32)
    for c in range(3):
        np.take(table[c], padded[..., c], out=out[c])
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles = out.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    return tiles, (rows, cols)


def preprocess_mllama(images, settings: MllamaImageSettings) -> dict:
    nested = nest_images(images)
    counts = [len(sample) for sample in nested]
    max_tiles = settings.max_image_tiles
    tile = settings.size["height"]
    table = normalization_table(settings)
    flat = parallel_map(lambda im: _tiles(im, settings, table), [im for sample in nested for im in sample])
    result = {"num_images": counts, "num_tiles": []}
    if not flat:
        return result
    m = max(counts)
    pixels = np.zeros((len(nested), m, max_tiles, 3, tile, tile), dtype=np.float32)
    ids = np.zeros((len(nested), m), dtype=np.int64)
    mask = np.zeros((len(nested), m, max_tiles), dtype=np.int64)
    mask[:, :, 0] = 1
    it = iter(flat)
    for i, count in enumerate(counts):
        tiles_per_image = []
        for j in range(count):
            tiles, (rows, cols) = next(it)
            pixels[i, j, : len(tiles)] = tiles
            ids[i, j] = supported_aspect_ratios(max_tiles).index((rows, cols)) + 1
            mask[i, j, : rows * cols] = 1
            tiles_per_image.append(rows * cols)
        result["num_tiles"].append(tiles_per_image)
    result.update(pixel_values=torch.from_numpy(pixels), aspect_ratio_ids=torch.from_numpy(ids),
                  aspect_ratio_mask=torch.from_numpy(mask))
    return result
