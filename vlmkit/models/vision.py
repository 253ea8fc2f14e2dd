"""One ViT for every family: CLIP flavour (class token, pre-layernorm) or SigLIP flavour (post-layernorm,
native resolution with a patch mask and positions bucketed onto the fixed grid)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import VisionConfig
from .layers import MLP, attention, merge_heads, split_heads


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=cfg.attn_bias) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = (split_heads(p(x), self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(merge_heads(attention(q, k, v, mask)))


class VisionLayer(nn.Module):
    """Pre-norm attention + MLP; `gated` (Mllama's global layers) scales both branches by tanh of a learned gate."""

    def __init__(self, cfg: VisionConfig, gated: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.act)
        self.gate_attn = nn.Parameter(torch.zeros(1)) if gated else None
        self.gate_mlp = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, x, mask):
        h = self.attn(self.norm1(x), mask)
        x = x + (h if self.gate_attn is None else self.gate_attn.tanh() * h)
        h = self.mlp(self.norm2(x))
        return x + (h if self.gate_mlp is None else self.gate_mlp.tanh() * h)


def bucketed_position_ids(patch_mask: torch.Tensor, grid: int) -> torch.Tensor:
    """patch_mask bool [N, h, w] -> position ids [N, h*w] on the grid x grid table (Idefics2/3, NaViT-style):
    an image's real patches are spread over the whole table whatever its aspect ratio; padding gets id 0."""
    n, h, w = patch_mask.shape
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, device=patch_mask.device)
    rows = patch_mask[:, :, 0].sum(dim=1)  # real patch rows per image
    cols = patch_mask[:, 0, :].sum(dim=1)
    frac_h = (torch.arange(h, device=patch_mask.device)[None] * (1.0 / rows)[:, None]).clamp(max=1.0 - 1e-6)
    frac_w = (torch.arange(w, device=patch_mask.device)[None] * (1.0 / cols)[:, None]).clamp(max=1.0 - 1e-6)
    bucket_h = torch.bucketize(frac_h, boundaries, right=True)
    bucket_w = torch.bucketize(frac_w, boundaries, right=True)
    ids = (bucket_h[:, :, None] * grid + bucket_w[:, None, :]).reshape(n, -1)
    return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.class_embed = nn.Parameter(torch.zeros(d)) if cfg.class_token else None
        self.pos_embed = nn.Embedding(cfg.num_positions, d)
        self.pre_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.pre_norm else None
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))
        # Always present: checkpoints carry it even when the selected features skip it (CLIP, LLaVA).
        self.post_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def patch_mask(self, pixel_mask: torch.Tensor) -> torch.Tensor:
        """Pixel mask [N, H, W] -> patch mask [N, H/p, W/p]: Idefics2 keeps fully real patches, Idefics3 any."""
        p = self.cfg.patch_size
        n, h, w = pixel_mask.shape
        counts = pixel_mask[:, : h // p * p, : w // p * p].reshape(n, h // p, p, w // p, p).long().sum(dim=(2, 4))
        return counts > 0 if self.cfg.patch_keep_partial else counts == p * p

    def embed(self, pixel_values: torch.Tensor, patch_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if self.cfg.native_resolution:
            if patch_mask is None:
                patch_mask = torch.ones(x.shape[0], *pixel_values.shape[2:], dtype=torch.bool, device=x.device)
                patch_mask = patch_mask[:, :: self.cfg.patch_size, :: self.cfg.patch_size]
            x = x + self.pos_embed(bucketed_position_ids(patch_mask, self.cfg.grid))
        else:
            if x.shape[1] + (1 if self.class_embed is not None else 0) != self.cfg.num_positions:
                raise ValueError(
                    f"image of {tuple(pixel_values.shape[-2:])} px gives {x.shape[1]} patches, but this vision "
                    f"tower is fixed at {self.cfg.image_size} px ({self.cfg.grid ** 2} patches)"
                )
            if self.class_embed is not None:
                x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
            x = x + self.pos_embed.weight[None].to(x.dtype)
        return self.pre_norm(x) if self.pre_norm is not None else x

    def forward(self, pixel_values: torch.Tensor, patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """pixel_values [N, C, H, W] -> features [N, tokens, hidden] of the configured layer."""
        x = self.embed(pixel_values, patch_mask)
        mask = None
        if patch_mask is not None:
            mask = patch_mask.reshape(patch_mask.shape[0], 1, 1, -1)
        # hidden states are [embeddings, layer 1 .. layer N]; stop at the selected one.
        n = self.cfg.num_layers
        stop = self.cfg.feature_layer % (n + 1)
        for layer in self.layers[:stop]:
            x = layer(x, mask)
        if self.cfg.post_norm_features:
            x = self.post_norm(x)
        if self.cfg.drop_class_token and self.class_embed is not None:
            x = x[:, 1:]
        return x
