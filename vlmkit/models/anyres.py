"""LLaVA-NeXT "anyres": the feature packing step (spatial unpad by the original size, `image_newline` after each
row, base image first); the tiling geometry lives in anyres_grid.py.

Ground truth: transformers 5.x `select_best_resolution`, `image_size_to_num_patches`, `unpad_image` and
`LlavaNextModel.pack_image_features` (only the `spatial_unpad` merge, the one transformers implements)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AnyresConfig, VisionConfig
from .anyres_grid import grid_shape, num_patches, unpadded_size


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
