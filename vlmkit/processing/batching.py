"""Encoded rows -> padded tensors: the mechanics of every family's batch; `formats.Format.collate` decides which
apply (the pixel layout is the family's).

Token rows are padded on the LEFT (pad id, attention_mask 0, label IGNORE); image slots missing in a row are
all-zero images and smaller images are padded with zeros bottom/right (pixel masks with 0 there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["EncodedRow", "CollateError", "IGNORE", "pad_tokens", "pad_slots", "pad_image_masks"]

IGNORE = -100  # label of a token that carries no loss


class CollateError(ValueError):
    """Processor outputs that cannot be merged into one batch (the server then prefills them one by one)."""


@dataclass
class EncodedRow:
    """One prompt before padding: ids (+ labels and positions when training) and this row's image tensors."""

    input_ids: list  # or a 1-D tensor
    labels: Optional[list] = None
    positions: Optional[list] = None
    pixels: Optional[torch.Tensor] = None  # [M, 3, H, W]: images (crops for Idefics2/3)
    pixel_mask: Optional[torch.Tensor] = None  # [M, H, W] (Idefics2/3); Mllama: aspect_ratio_mask [M, tiles]
    image_mask: Optional[torch.Tensor] = None  # [T, M] (IDEFICS image_attention_mask); Mllama: [T, M, tiles]
    image_grid: Optional[torch.Tensor] = None  # [M, 3] (Qwen2-VL image_grid_thw; pixels are then flat patches)
    image_sizes: Optional[torch.Tensor] = None  # [M, 2] (LLaVA-NeXT: each image's height, width)
    token_types: Optional[list] = None  # token_type_ids (Gemma 3: image tokens 1; PaliGemma: suffix 1)
    indices: list = field(default_factory=list)  # the training examples in this row
    extra: dict = field(default_factory=dict)  # a family's other per-row tensors (Mllama: aspect_ratio_ids)


def pad_tokens(rows: list, pad_token_id: int, positions: bool = False) -> dict:
    """input_ids and attention_mask [B, T] (+ labels when the rows have them, + position_ids with `positions`)."""
    b, t = len(rows), max(len(r.input_ids) for r in rows)
    ids = rows[0].input_ids
    device = ids.device if isinstance(ids, torch.Tensor) else None
    batch = {"input_ids": torch.full((b, t), pad_token_id, dtype=torch.long, device=device),
             "attention_mask": torch.zeros(b, t, dtype=torch.long, device=device)}
    if rows[0].labels is not None:
        batch["labels"] = torch.full((b, t), IGNORE, dtype=torch.long, device=device)
    if positions:
        batch["position_ids"] = torch.zeros(b, t, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        if not n:
            continue
        batch["input_ids"][i, t - n:] = torch.as_tensor(r.input_ids)
        batch["attention_mask"][i, t - n:] = 1
        if r.labels is not None:
            batch["labels"][i, t - n:] = torch.as_tensor(r.labels)
        if positions:
            batch["position_ids"][i, t - n:] = torch.as_tensor(r.positions)
    return batch


def pad_slots(rows: list) -> dict:
    """pixel_values [B, M, 3, H, W] (+ pixel_attention_mask [B, M, H, W] when rows have masks), M >= 1 the most
    slots of a row, H x W the largest image; {} when no row has a pixel tensor."""
    with_px = [r for r in rows if r.pixels is not None and len(r.pixels)]
    shaped = with_px or [r for r in rows if r.pixels is not None]  # empty tensors still give H x W
    if not shaped:
        return {}
    ref = shaped[0].pixels
    m = max(1, max(len(r.pixels) if r.pixels is not None else 0 for r in rows))
    h = max((r.pixels.shape[-2] for r in with_px), default=ref.shape[-2])
    w = max((r.pixels.shape[-1] for r in with_px), default=ref.shape[-1])
    out = {"pixel_values": torch.zeros(len(rows), m, ref.shape[-3], h, w, dtype=ref.dtype, device=ref.device)}
    masks = [r.pixel_mask for r in rows if r.pixel_mask is not None]
    if masks:
        out["pixel_attention_mask"] = torch.zeros(len(rows), m, h, w, dtype=masks[0].dtype, device=ref.device)
    for i, r in enumerate(rows):
        k = len(r.pixels) if r.pixels is not None else 0
        if k:
            out["pixel_values"][i, :k, :, :r.pixels.shape[-2], :r.pixels.shape[-1]] = r.pixels
        if r.pixel_mask is not None and k:
            out["pixel_attention_mask"][i, :k, :r.pixel_mask.shape[-2], :r.pixel_mask.shape[-1]] = r.pixel_mask
    return out


def pad_image_masks(rows: list, slots: int, dtype: torch.dtype) -> torch.Tensor:
    """Each row's [T, M] image mask (tokens x images) -> [B, T, slots], left-padded like the tokens."""
    t = max(len(r.input_ids) for r in rows)
    device = next((r.image_mask.device for r in rows if r.image_mask is not None), None)
    out = torch.zeros(len(rows), t, slots, dtype=dtype, device=device)
    for i, r in enumerate(rows):
        if r.image_mask is not None:
            out[i, t - len(r.input_ids):, :r.image_mask.shape[1]] = r.image_mask
    return out
