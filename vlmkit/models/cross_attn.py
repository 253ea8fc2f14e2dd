"""IDEFICS / Flamingo gated cross-attention: text tokens attend to image features through tanh gates."""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; context [B, L, C]; mask bool [B, 1, T, L]."""
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
