"""One ViT for every family: CLIP flavour (class token, pre-layernorm), SigLIP flavour (post-layernorm,
native resolution with a patch mask and positions bucketed onto the fixed grid), Qwen2-VL flavour (flat patches of
any grid, 2D rotary instead of a position table, each image attending to itself; Qwen2.5-VL: RMSNorm, SwiGLU and
windows)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import VisionConfig
from .layers import MLP, RMSNorm, SwiGLU, attention, merge_heads, split_heads
from .rope import apply_vision_rope, vision_patch_positions, vision_rope_cos_sin, window_index


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=cfg.attn_bias) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = (split_heads(p(x), self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(merge_heads(attention(q, k, v, mask)))


class RotaryAttention(nn.Module):
    """Qwen2-VL: fused qkv projection, 2D rotary on queries and keys; x [P, D] (all images' patches)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, bounds: torch.Tensor, rope) -> torch.Tensor:
        p = x.shape[0]
        q, k, v = self.qkv(x).reshape(p, 3, self.heads, self.head_dim).unbind(1)
        q, k = apply_vision_rope(q, *rope), apply_vision_rope(k, *rope)
        return self.proj(segment_attention(q, k, v, bounds).reshape(p, -1))


def segment_attention(q, k, v, bounds: torch.Tensor) -> torch.Tensor:
    """q, k, v [P, H, D]; the patches of each segment (an image, or a window; `bounds` cumulative, from 0) attend
    within it. Segments of one length run as one batch (windows mostly share a size): no [P, P] mask, which
    several large images would make gigabytes."""
    out = torch.empty_like(q)
    starts, lengths = bounds[:-1].tolist(), (bounds[1:] - bounds[:-1]).tolist()
    by_length: dict = {}
    for s, n in zip(starts, lengths):
        by_length.setdefault(n, []).append(s)
    for n, group in by_length.items():
        idx = (torch.tensor(group, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(-1)
        qs, ks, vs = (t[idx].reshape(len(group), n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out[idx] = attention(qs, ks, vs).transpose(1, 2).reshape(len(group) * n, *q.shape[1:])
    return out


class VisionLayer(nn.Module):
    """Pre-norm attention + MLP; `gated` (Mllama's global layers) scales both branches by tanh of a learned gate."""

    def __init__(self, cfg: VisionConfig, gated: bool = False):
        super().__init__()
        d = cfg.hidden_size
        norm = RMSNorm if cfg.norm == "rmsnorm" else nn.LayerNorm
        self.norm1 = norm(d, eps=cfg.layer_norm_eps)
        self.attn = RotaryAttention(cfg) if cfg.flavour == "qwen2_vl" else VisionAttention(cfg)
        self.norm2 = norm(d, eps=cfg.layer_norm_eps)
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLU(d, cfg.intermediate_size, act=cfg.act, bias=True)
        else:
            self.mlp = MLP(d, cfg.intermediate_size, act=cfg.act)
        self.gate_attn = nn.Parameter(torch.zeros(1)) if gated else None
        self.gate_mlp = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, x, mask, rope=None):
        """mask: a bool attention mask, or with `rope` (Qwen2-VL) the segment bounds (images or windows)."""
        h = self.attn(self.norm1(x), mask) if rope is None else self.attn(self.norm1(x), mask, rope)
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


class PatchLinear(nn.Module):
    """Qwen2-VL's Conv3d patch embedding as the matrix product it is (kernel = stride = the whole patch); the
    weight keeps the checkpoint's [D, C, T, p, p] shape."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p = cfg.patch_size
        self.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.num_channels, cfg.temporal_patch_size, p, p))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(self.weight.shape[0], -1)
        if patches.shape[-1] != w.shape[1]:
            raise ValueError(f"patches of {patches.shape[-1]} values, the patch embedding takes {w.shape[1]}")
        return patches.to(w.dtype) @ w.t()


class RotaryVisionTransformer(nn.Module):
    """Qwen2-VL / Qwen2.5-VL ViT: flat patches [P, C*T*p*p] + image_grid_thw [N, 3] -> patch features [P, D] in
    the processor's order (each spatial_merge_size^2 block of patches contiguous, for the patch merger)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchLinear(cfg)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg, merge = self.cfg, self.cfg.spatial_merge_size
        if patches.dim() != 2 or int(grid_thw.prod(-1).sum()) != patches.shape[0]:
            raise ValueError(f"pixel_values {tuple(patches.shape)} do not hold the {int(grid_thw.prod(-1).sum())} "
                             f"patches image_grid_thw describes")
        x = self.patch_embed(patches)
        cos, sin = vision_rope_cos_sin(vision_patch_positions(grid_thw, merge), cfg.hidden_size // cfg.num_heads,
                                       cfg.rope_theta)
        sizes = grid_thw.prod(-1)
        full = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])  # each image attends to itself
        order = None
        if cfg.window_size:
            order, bounds = window_index(grid_thw, merge, cfg.window_size, cfg.patch_size)
            unit = merge * merge

            def regroup(t):
                return t.reshape(-1, unit, *t.shape[1:])[order].reshape(t.shape)

            x, cos, sin = regroup(x), regroup(cos), regroup(sin)
            windowed = bounds
        for i, layer in enumerate(self.layers):
            bounds = full if order is None or i in cfg.fullatt_block_indexes else windowed
            x = layer(x, bounds, (cos, sin))
        if order is not None:  # back to the processor's order
            x = x.reshape(-1, unit, x.shape[-1])[torch.argsort(order)].reshape(x.shape)
        return x


def build_vision(cfg: VisionConfig) -> nn.Module:
    return RotaryVisionTransformer(cfg) if cfg.flavour == "qwen2_vl" else VisionTransformer(cfg)
