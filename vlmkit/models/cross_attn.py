"""IDEFICS / Flamingo gated cross-attention: text tokens attend to image features through tanh gates."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import CrossAttnConfig, TextConfig
from .layers import RMSNorm, SwiGLU, attention, merge_heads, split_heads


def expand_image_mask(image_mask: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """[B, T, num_images] (1 = this token may see that image) -> bool [B, 1, T, num_images * tokens_per_image].

    The processor decides which image each token sees (IDEFICS: only the latest image before it)."""
    b, t, n = image_mask.shape
    return image_mask.bool()[..., None].expand(b, t, n, tokens_per_image).reshape(b, 1, t, n * tokens_per_image)


class GatedCrossAttention(nn.Module):
    """x += tanh(alpha_attn) * xattn(norm(x), images); x += tanh(alpha_mlp) * mlp(norm(x)).

    Gates start at zero in a fresh model, so the pretrained decoder is unchanged until training opens them.
    Tokens that see no image get no cross-attention output at all (their attention row is empty)."""

    def __init__(self, text: TextConfig, cfg: CrossAttnConfig):
        super().__init__()
        self.heads, self.head_dim = text.num_heads, text.hidden_size // text.num_heads
        inner = self.heads * self.head_dim
        self.attn_norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.q_proj = nn.Linear(text.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(cfg.context_dim, inner, bias=False)
        self.v_proj = nn.Linear(cfg.context_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, text.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, text.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, text.rms_norm_eps) if cfg.qk_norm else None
        self.mlp_norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.mlp = SwiGLU(text.hidden_size, text.intermediate_size, act=text.act)
        gate_shape = (1, 1, text.hidden_size) if cfg.gate_kind == "vector" else (1,)
        self.alpha_attn = nn.Parameter(torch.zeros(gate_shape))
        self.alpha_mlp = nn.Parameter(torch.zeros(gate_shape))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor, cache=None) -> torch.Tensor:
        """x [B, T, D]; context [B, L, C]; mask bool [B, 1, T, L]; cache unused (keys/values are recomputed)."""
        h = self.attn_norm(x)
        q = split_heads(self.q_proj(h), self.heads, self.head_dim)
        k = split_heads(self.k_proj(context), self.heads, self.head_dim)
        v = split_heads(self.v_proj(context), self.heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        sees_image = mask.any(dim=-1, keepdim=True)  # [B, 1, T, 1]
        # Rows with no visible image would softmax over nothing (NaN): let them see everything, then zero them.
        out = attention(q, k, v, mask | ~sees_image)
        out = merge_heads(out).masked_fill(~sees_image[:, 0], 0.0)
        x = x + torch.tanh(self.alpha_attn) * self.o_proj(out)
        return x + torch.tanh(self.alpha_mlp) * self.mlp(self.mlp_norm(x))


class MllamaCrossAttention(nn.Module):
    """A Llama 3.2 Vision cross-attention layer: x += tanh(attn_gate) * xattn(norm(x)), then
    x += tanh(mlp_gate) * sees_image * mlp(norm(x)); grouped key/value heads, RMS q/k norms per head.

    Unlike IDEFICS, a token that sees no image still gets the attention output, over every image token (its mask
    row is opened, as transformers does); only its MLP output is dropped. Keys/values are projected once per
    image context and kept in the decoder's cache (`cache.cross_kv`)."""

    def __init__(self, text: TextConfig, cfg: CrossAttnConfig, index: int):
        super().__init__()
        self.index = index
        self.heads, self.kv_heads, self.head_dim = text.num_heads, text.num_kv_heads, text.head_dim
        d = text.hidden_size
        self.attn_norm = RMSNorm(d, text.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.context_dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.context_dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, text.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, text.rms_norm_eps)
        self.mlp_norm = RMSNorm(d, text.rms_norm_eps)
        self.mlp = SwiGLU(d, text.intermediate_size, act=text.act)
        self.alpha_attn = nn.Parameter(torch.zeros(1))
        self.alpha_mlp = nn.Parameter(torch.zeros(1))

    def keys_values(self, context: torch.Tensor, cache=None):
        kept = getattr(cache, "cross_kv", None)
        if kept is not None and self.index in kept and kept[self.index][0] is context:
            return kept[self.index][1:]
        k = self.k_norm(split_heads(self.k_proj(context), self.kv_heads, self.head_dim))
        v = split_heads(self.v_proj(context), self.kv_heads, self.head_dim)
        if kept is not None:
            kept[self.index] = (context, k, v)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask, cache=None) -> torch.Tensor:
        """x [B, T, D]; context [B, L, C]; mask: `mllama_masks`' (attend, sees_image)."""
        attend, sees_image = mask
        q = self.q_norm(split_heads(self.q_proj(self.attn_norm(x)), self.heads, self.head_dim))
        k, v = self.keys_values(context, cache)
        live = attend.any(dim=-1, keepdim=True)  # [B, 1, T, 1]: rows with something to attend to
        out = attention(q, k, v, attend | ~live)
        h = x + torch.tanh(self.alpha_attn) * self.o_proj(merge_heads(out))
        h = h + torch.tanh(self.alpha_mlp) * self.mlp(self.mlp_norm(h)) * sees_image[:, 0].to(x.dtype)
        return torch.where(live[:, 0], h, x)


def mllama_masks(mask: torch.Tensor, real_images: Optional[torch.Tensor]):
    """Mllama's cross-attention rows: mask bool [B, 1, T, L] (token sees image token), real_images bool [B, L]
    (the row's own image tokens, padding slots of a batch excluded; None: none known, as on decode steps).
    -> (attend [B, 1, T, L], sees_image [B, 1, T, 1]). A token that sees no image attends to all of its row's
    images (transformers' full-row rule: a lone prompt has no padding slots) and adds no MLP output; a row with
    no image at all attends to nothing and the layer leaves it unchanged, as a prompt without images skips it."""
    sees_image = mask.any(dim=-1, keepdim=True)
    if real_images is None:
        return mask, sees_image
    return mask | (~sees_image & real_images[:, None, None, :]), sees_image


def cross_blocks(text: TextConfig, cfg: CrossAttnConfig) -> tuple[nn.ModuleList, list[int]]:
    """The decoder's cross-attention blocks and, for each, the self-attention layer it runs before (== the number
    of self-attention layers: after the last one)."""
    if cfg.kind == "mllama":
        stack = sorted(cfg.layers)
        blocks = nn.ModuleList(MllamaCrossAttention(text, cfg, k) for k in range(len(stack)))
        return blocks, [j - k for k, j in enumerate(stack)]
    blocks = nn.ModuleList(GatedCrossAttention(text, cfg) for _ in range(text.num_layers // cfg.every))
    return blocks, [k * cfg.every for k in range(len(blocks))]
