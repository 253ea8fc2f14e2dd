"""LLaVA-NeXT "anyres": the tiling geometry (shared with its image processor and placeholder count) and the
feature packing step (spatial unpad by the original size, `image_newline` after each row, base image first).

Ground truth: transformers 5.x `select_best_resolution`, `image_size_to_num_patches`, `unpad_image` and
`LlavaNextModel.pack_image_features` (only the `spatial_unpad` merge, the one transformers implements)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AnyresConfig, VisionConfig


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The [height, width] of `pinpoints` that keeps most of the image's pixels, then wastes fewest."""
    if not pinpoints:
        raise ValueError("image_grid_pinpoints is empty: LLaVA-NeXT needs at least one grid resolution")
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(h), int(w)), effective, wasted
    if best is None:
        raise ValueError(f"no grid resolution in {pinpoints} fits an image of {height}x{width}")
    return best


def grid_shape(height: int, width: int, pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles of side `tile` the image of height x width is cut into."""
    h, w = select_best_resolution(height, width, pinpoints)
    return h // tile, w // tile


def num_patches(height: int, width: int, pinpoints, tile: int) -> int:
    """Vision inputs one image becomes: its grid tiles plus the whole image (the base patch, first)."""
    h, w = select_best_resolution(height, width, pinpoints)
    return -(-h // tile) * -(-w // tile) + 1


def unpadded_size(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """The feature grid grid_h x grid_w of the padded tiles, cut back to the image's aspect ratio ->
    (top, kept rows, left, kept cols). The same rounding as transformers' unpad_image."""
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - 2 * pad, 0, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - 2 * pad


def feature_count(height: int, width: int, anyres: AnyresConfig, vision: VisionConfig, extra_tokens: int = 0) -> int:
    """Features (= image tokens) one image of height x width gives: base tile + unpadded grid + one newline per
    row. extra_tokens: per-tile tokens beyond the patch grid (a kept class token)."""
    side = vision.image_size // vision.patch_size
    rows, cols = grid_shape(height, width, anyres.grid_pinpoints, vision.image_size)
    _, kept_h, _, kept_w = unpadded_size(height, width, rows * side, cols * side)
    return side * side + extra_tokens + kept_h * kept_w + (kept_h if anyres.newline else 0)


class AnyresPacker(nn.Module):
    """Per image: projected tile features [tiles, side*side, D] (base tile first) -> [tokens, D]."""

    def __init__(self, anyres: AnyresConfig, vision: VisionConfig, width: int):
        super().__init__()
        self.pinpoints, self.tile = anyres.grid_pinpoints, vision.image_size
        self.side = vision.image_size // vision.patch_size
        self.image_newline = nn.Parameter(torch.zeros(width)) if anyres.newline else None

    def patch_counts(self, image_sizes) -> list[int]:
        return [num_patches(int(h), int(w), self.pinpoints, self.tile) for h, w in image_sizes]

    def forward(self, features: torch.Tensor, height: int, width: int) -> torch.Tensor:
        newline = None if self.image_newline is None else self.image_newline.to(features.dtype)
        if features.shape[0] == 1:
            base = features[0]
            return base if newline is None else torch.cat([base, newline[None]])
        side, d = self.side, features.shape[-1]
        if features.shape[1] != side * side:
            raise ValueError(f"LLaVA-NeXT tiles give {features.shape[1]} features each, the {side}x{side} patch grid "
                             f"needs {side * side} (a class token kept by vision_feature_select_strategy='full'?)")
        rows, cols = grid_shape(height, width, self.pinpoints, self.tile)
        if features.shape[0] - 1 != rows * cols:
            raise ValueError(f"an image of {height}x{width} is {rows}x{cols} tiles + the base image, got "
                             f"{features.shape[0]} tiles")
        grid = features[1:].view(rows, cols, side, side, d).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, d)
        top, kept_h, left, kept_w = unpadded_size(height, width, rows * side, cols * side)
        grid = grid[top:top + kept_h, left:left + kept_w]
        if newline is not None:
            grid = torch.cat([grid, newline.expand(kept_h, 1, d)], dim=1)
        return torch.cat([features[0], grid.reshape(-1, d)])
