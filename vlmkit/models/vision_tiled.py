"""Mllama's tiled ViT: the one ViT's patch embedding, class token and layers, over the tiles of each image, plus
what tiling adds: aspect-ratio embeddings before and after the local layers, gated tile-position embeddings, a
gated global transformer over all tiles of an image, and the outputs of chosen local layers joined to the features.

Reference: transformers 5 `MllamaVisionModel`. Quirks kept as they are there: each tile's patch rows are padded to a
multiple of 8, and the attention mask only stops padding from seeing padding (real tokens see every token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .vision import VisionLayer, VisionTransformer


class AspectRatioEmbedding(nn.Module):
    """x [N, tiles, tokens, D] += tanh(gate) * table[aspect_ratio_id] (one vector per tile)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(cfg.num_aspect_ratios + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(aspect_ratio_ids).reshape(-1, self.tiles, 1, self.dim)
        return x + e * self.gate.tanh()


class TiledVisionTransformer(VisionTransformer):
    """pixel_values [N, tiles, C, S, S] (N images), aspect_ratio_ids [N], aspect_ratio_mask [N, tiles] ->
    features [N, tiles, patches + 1, D * (1 + len(intermediate_layers))]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        d, p = cfg.hidden_size, cfg.num_positions
        self.pos_gate = nn.Parameter(torch.zeros(1))  # mixes the plain and the tile-specific position tables
        self.tile_pos_embed = nn.Embedding(cfg.num_aspect_ratios + 1, cfg.max_num_tiles * p * d)
        self.pre_tile = AspectRatioEmbedding(cfg)
        self.post_tile = AspectRatioEmbedding(cfg)
        self.global_layers = nn.ModuleList(VisionLayer(cfg, gated=True) for _ in range(cfg.num_global_layers))

    @property
    def output_dim(self) -> int:
        return self.cfg.hidden_size * (1 + len(self.cfg.intermediate_layers))

    def attention_mask(self, aspect_ratio_mask: torch.Tensor, padded: int) -> torch.Tensor:
        """bool [N, 1, L, L] over the tiles' padded token rows: everything but padding looking at padding."""
        n, tiles = aspect_ratio_mask.shape
        real = aspect_ratio_mask.bool()[:, :, None].expand(n, tiles, padded).clone()
        real[:, :, self.cfg.num_positions:] = False
        pad = ~real.reshape(n, tiles * padded)
        return ~(pad[:, :, None] & pad[:, None, :])[:, None]

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        cfg = self.cfg
        n, tiles = pixel_values.shape[:2]
        if tiles != cfg.max_num_tiles:
            raise ValueError(f"pixel_values has {tiles} tiles per image, this vision tower takes {cfg.max_num_tiles}")
        d, p = cfg.hidden_size, cfg.num_positions
        x = self.patch_embed(pixel_values.flatten(0, 1).to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if x.shape[1] + 1 != p:
            raise ValueError(f"tiles of {tuple(pixel_values.shape[-2:])} px give {x.shape[1]} patches, this vision "
                             f"tower takes {cfg.image_size} px tiles ({p - 1} patches)")
        x = self.pre_tile(x.reshape(n, tiles, p - 1, d), aspect_ratio_ids).reshape(n * tiles, p - 1, d)
        x = torch.cat([self.class_embed.expand(n * tiles, 1, d).to(x.dtype), x], dim=1).reshape(n, tiles, p, d)
        gate = self.pos_gate.tanh()
        x = x + (1 - gate) * self.pos_embed.weight.view(1, 1, p, d)
        x = x + gate * self.tile_pos_embed(aspect_ratio_ids).reshape(n, tiles, p, d)
        x = self.pre_norm(x)
        padded = -(-p // 8) * 8
        x = F.pad(x, (0, 0, 0, padded - p)).reshape(n, tiles * padded, d)
        mask = self.attention_mask(aspect_ratio_mask.reshape(n, tiles), padded)
        kept = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i in cfg.intermediate_layers:
                kept[i] = x
        x = self.post_tile(self.post_norm(x).reshape(n, tiles, padded, d), aspect_ratio_ids)
        x = x.reshape(n, tiles * padded, d)
        for layer in self.global_layers:
            x = layer(x, mask)
        x = x.reshape(n, tiles, padded, d)[:, :, :p]
        # stacked on a last axis, then flattened: each feature's layers are adjacent (transformers' layout)
        kept = torch.stack([kept[i] for i in cfg.intermediate_layers], dim=-1)
        kept = kept.reshape(n, tiles, padded, -1)[:, :, :p]
        return torch.cat([x, kept], dim=-1)
