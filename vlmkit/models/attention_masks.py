"""Attention masks beyond causal: bidirectional groups (Gemma 3's image blocks, PaliGemma's prefix) and sliding
windows (Gemma 2/3 local layers), as transformers' masking_utils composes them:
    full layers     causal OR same-group, AND real keys
    local layers    (causal OR same-group) AND key within the window (q - k < window), AND real keys
Masks are bool [B, 1, T, S] (True = attend) over the S = cached + new keys; queries are the last T of them."""

from __future__ import annotations

from typing import Optional

import torch


def image_groups(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, T] -> group id per token: each run of image tokens is one group (0, 1, ...), other tokens -1
    (transformers' get_block_sequence_ids_for_mask on token_type_ids = image tokens)."""
    is_image = input_ids == image_token_id
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~previous
    ids = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_image, ids, torch.full_like(ids, -1))


def prefix_groups(token_type_ids: Optional[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """PaliGemma's prefix-LM: tokens of type 0 (image + prompt) form one group; suffix tokens (type 1) and padding
    none. No token_type_ids: every real token of the chunk is prefix (a prompt without a suffix)."""
    real = attention_mask.bool()
    prefix = real if token_type_ids is None else real & (token_type_ids == 0)
    return torch.where(prefix, torch.zeros_like(real, dtype=torch.long), torch.full_like(real, -1, dtype=torch.long))


def add_groups(mask: torch.Tensor, groups: torch.Tensor, key_real: torch.Tensor) -> torch.Tensor:
    """mask [B, 1, T, S] OR (query and key in the same group and the key real); groups [B, T] cover the new
    tokens (cached keys belong to no group)."""
    b, t = groups.shape
    past = mask.shape[-1] - t
    keys = torch.cat([groups.new_full((b, past), -1), groups], dim=1)
    same = (groups[:, :, None] == keys[:, None, :]) & (groups[:, :, None] >= 0) & key_real.bool()[:, None, :]
    return mask | same[:, None]


def sliding(mask: torch.Tensor, window: int) -> torch.Tensor:
    """mask [B, 1, T, S] AND key index > query index - window (later keys are left to the mask)."""
    t, s = mask.shape[-2:]
    q_idx = torch.arange(s - t, s, device=mask.device)
    k_idx = torch.arange(s, device=mask.device)
    return mask & (k_idx[None, :] > q_idx[:, None] - window)
