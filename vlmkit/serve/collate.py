"""`collate`: single-prompt processor outputs merged into one left-padded batch, so several fresh prompts are
prefilled in one forward (the model runs as it does on a processor batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["collate", "CollateError"]


class CollateError(ValueError):
    """Processor outputs that cannot be merged into one batch (they are then prefilled one by one)."""


def collate(batches: list[dict], pad_token_id: int) -> dict:
    """Merge single-prompt processor outputs into one left-padded batch, as the processor pads a batch:
    input_ids (pad id) and attention_mask / image_attention_mask (0) on the left; LLaVA pixel_values
    [N, 3, H, W] concatenated in row order; IDEFICS-family pixel_values [B, M, 3, H, W] and pixel_attention_mask
    [B, M, H, W] padded with all-zero images (skipped by the model) and zero pixels bottom/right."""
    try:
        return _collate(batches, pad_token_id)
    except (RuntimeError, IndexError) as e:  # shapes that do not line up (e.g. LLaVA images of two sizes)
        raise CollateError(f"cannot merge these prompts into one batch: {e}") from None


def _collate(batches: list[dict], pad_token_id: int) -> dict:
    if len(batches) == 1:
        return dict(batches[0])
    keys = set().union(*batches)
    known = {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "image_attention_mask"}
    if keys - known:
        raise CollateError(f"cannot merge batch keys {sorted(keys - known)}")
    if any(b["input_ids"].shape[0] != 1 for b in batches):
        raise CollateError("collate takes single-prompt batches")
    width = max(b["input_ids"].shape[1] for b in batches)
    out = {
        "input_ids": torch.cat([F.pad(b["input_ids"], (width - b["input_ids"].shape[1], 0), value=pad_token_id)
                                for b in batches]),
        "attention_mask": torch.cat([F.pad(b["attention_mask"], (width - b["attention_mask"].shape[1], 0))
                                     for b in batches]),
    }
    pv = [b.get("pixel_values") for b in batches]
    present = [p for p in pv if p is not None]
    if present and present[0].dim() == 4:  # LLaVA: one flat list of images
        out["pixel_values"] = torch.cat(present)
    elif present:
        if any(p.dim() != 5 for p in present):
            raise CollateError("mixed pixel_values layouts")
        m = max(p.shape[1] for p in present)
        h = max(p.shape[3] for p in present)
        w = max(p.shape[4] for p in present)
        ref = present[0]
        out["pixel_values"] = torch.cat([
            torch.zeros(1, m, ref.shape[2], h, w, dtype=ref.dtype) if p is None
            else F.pad(p, (0, w - p.shape[4], 0, h - p.shape[3], 0, 0, 0, m - p.shape[1])) for p in pv])
        masks = [b.get("pixel_attention_mask") for b in batches]
        if any(x is not None for x in masks):
            mref = next(x for x in masks if x is not None)
            out["pixel_attention_mask"] = torch.cat([
                torch.zeros(1, m, h, w, dtype=mref.dtype) if x is None
                else F.pad(x, (0, w - x.shape[3], 0, h - x.shape[2], 0, m - x.shape[1])) for x in masks])
    iams = [b.get("image_attention_mask") for b in batches]
    if any(x is not None for x in iams):
        if any(x is None for x in iams):
            raise CollateError("image_attention_mask missing in some rows")
        m = max(x.shape[2] for x in iams)
        out["image_attention_mask"] = torch.cat([F.pad(x, (0, m - x.shape[2], width - x.shape[1], 0)) for x in iams])
    return out

