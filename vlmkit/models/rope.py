"""Qwen2-VL's rotary positions: the ViT's 2D rotary (height, width per patch), the decoder's multimodal RoPE
(M-RoPE: temporal, height and width rows of positions, each rotating its own section of the frequencies) and the
3D positions a prompt with images gets. Equal to transformers' Qwen2VL / Qwen2_5_VL (rotate-half layout)."""

from __future__ import annotations

from typing import Optional

import torch


# ---- vision -------------------------------------------------------------------------------------------------------
def vision_patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """grid_thw [N, 3] -> (row, col) of every patch [P, 2], in the processor's patch order: merge x merge blocks
    row-major, the patches of a block row-major inside it; repeated per temporal patch."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()
        cols = cols.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def vision_rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """positions [P, 2] -> cos, sin [P, head_dim] (float32): a quarter of the head's frequencies rotate by the row,
    a quarter by the column, each pair repeated in rotate-half layout."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half))
    freqs = positions[..., None].float() * inv_freq  # [P, 2, head_dim / 4]
    freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [P, H, D] (computed in float32 as the reference) with cos/sin [P, D]."""
    dtype, x = x.dtype, x.float()
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(dtype)


def window_index(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int):
    """Qwen2.5-VL window attention: the merged-token order that groups each window's tokens together [M], and the
    window boundaries in patches (cumulative, starting at 0; empty windows dropped)."""
    order, bounds, start = [], [0], 0
    win = window_size // merge // patch_size  # merged tokens per window side
    unit = merge * merge
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = (win - gh % win) % win, (win - gw % win) % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = torch.nn.functional.pad(index, (0, pad_w, 0, pad_h), value=-100)
        padded = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        counts = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        order.append(flat[flat != -100] + start)
        for c in (counts.cumsum(0) * unit + bounds[-1]).tolist():
            if c != bounds[-1]:
                bounds.append(c)
        start += t * gh * gw
    return torch.cat(order).to(grid_thw.device), torch.tensor(bounds, device=grid_thw.device)


# ---- decoder ------------------------------------------------------------------------------------------------------
def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, section: list, dtype: torch.dtype):
    """position_ids [3, B, T] -> cos, sin [B, 1, T, head_dim]: frequency chunk i (of sizes `section`) takes its
    positions from row i % 3 (temporal, height, width)."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [3, B, T, D/2]
    chunks = freqs.split(list(section), dim=-1)
    freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def mrope_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], grid_thw: Optional[torch.Tensor],
                    image_token_id: int, merge: int):
    """3D positions of a prompt batch -> (position_ids [3, B, T], deltas [B]).

    Text tokens count up on all three rows; an image's tokens take (start + t, start + row, start + col) and the
    text after it resumes at start + max(rows, cols). Padding (attention_mask 0) gets 0. delta = next position -
    real tokens, so a later token's position is (real tokens before it) + delta."""
    b, t = input_ids.shape
    positions = torch.zeros(3, b, t, dtype=torch.long, device=input_ids.device)
    deltas = torch.zeros(b, dtype=torch.long, device=input_ids.device)
    grids = iter(grid_thw.tolist()) if grid_thw is not None else iter(())
    for row in range(b):
        keep = (attention_mask[row].bool() if attention_mask is not None
                else torch.ones(t, dtype=torch.bool, device=input_ids.device))
        ids = input_ids[row][keep].tolist()
        out, pos, i = [], 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                j = i
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                out.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos, i = pos + j - i, j
                continue
            try:
                gt, gh, gw = next(grids)
            except StopIteration:
                raise ValueError("the prompt has more images (runs of image tokens) than image_grid_thw rows") from None
            gh, gw = gh // merge, gw // merge
            n = gt * gh * gw
            run = ids[i:i + n]  # shorter only when the ids so far end inside this image (a chunked prefill)
            if run != [image_token_id] * len(run) or (len(run) < n and i + len(run) < len(ids)):
                raise ValueError(f"an image of grid {gt}x{gh}x{gw} needs {n} consecutive image tokens")
            tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
            out.append(torch.stack([tt, hh, ww]).reshape(3, -1)[:, :len(run)] + pos)
            pos, i = pos + max(gh, gw), i + n
        if out:
            row_pos = torch.cat(out, dim=1).to(input_ids.device)
            positions[:, row, keep] = row_pos
            deltas[row] = int(row_pos.max()) + 1 - len(ids)
    return positions, deltas
