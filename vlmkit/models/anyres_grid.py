"""LLaVA-NeXT "anyres" tiling geometry, without torch (shared by the model's packing step, its image processor, the
placeholder count and `vlmkit info`'s torch-free path): which grid an image is cut into and how many features it
gives.

Ground truth: transformers 5.x `select_best_resolution`, `image_size_to_num_patches`, `unpad_image` and
`LlavaNextModel.pack_image_features` (only the `spatial_unpad` merge, the one transformers implements)."""

from __future__ import annotations

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


def image_tokens(cfg) -> dict:
    """tokens_per_image: fixed, or (LLaVA-NeXT anyres) the most an image can take, with its tiling."""
    if cfg.anyres is None:
        return {"tokens_per_image": cfg.tokens_per_image}
    tile, pins = cfg.vision.image_size, cfg.anyres.grid_pinpoints
    return {"tokens_per_image": max(feature_count(h, w, cfg.anyres, cfg.vision) for h, w in pins),
            "anyres_grids": [[h // tile, w // tile] for h, w in pins]}
