"""Connectors: what turns vision features into what the text side consumes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ConnectorConfig
from .layers import MLP, GemmaRMSNorm, RMSNorm, SwiGLU, attention, merge_heads, split_heads


class LinearProjector(nn.Module):
    """LLaVA `linear`."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.in_dim, cfg.out_dim, bias=cfg.bias)

    def forward(self, x, patch_mask=None):
        return self.proj(x)


class MLPProjector(MLP):
    """LLaVA `mlp2x_gelu`: Linear-GELU-Linear."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__(cfg.in_dim, cfg.out_dim, cfg.out_dim, act=cfg.act, bias=cfg.bias)

    def forward(self, x, patch_mask=None):
        return super().forward(x)


class Identity(nn.Module):
    """IDEFICS without its resampler: cross-attention reads the raw patch features."""

    def forward(self, x, patch_mask=None):
        return x


class PerceiverAttention(nn.Module):
    """Latents attend to [context; latents]; grouped-query heads and optional per-head qk-norm."""

    def __init__(self, dim: int, cfg: ConnectorConfig, norm):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.q_proj = nn.Linear(dim, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, dim, bias=False)
        self.q_norm = norm(self.head_dim) if cfg.qk_norm else None
        self.k_norm = norm(self.head_dim) if cfg.qk_norm else None

    def forward(self, latents, context, mask):
        both = torch.cat([context, latents], dim=1)
        q = split_heads(self.q_proj(latents), self.heads, self.head_dim)
        k = split_heads(self.k_proj(both), self.kv_heads, self.head_dim)
        v = split_heads(self.v_proj(both), self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(merge_heads(attention(q, k, v, mask)))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, cfg: ConnectorConfig, norm, mlp):
        super().__init__()
        self.latents_norm, self.context_norm = norm(dim), norm(dim)
        self.attn = PerceiverAttention(dim, cfg, norm)
        self.mlp_norm = norm(dim)
        self.mlp = mlp

    def forward(self, latents, context, mask):
        latents = latents + self.attn(self.latents_norm(latents), self.context_norm(context), mask)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nn.Module):
    """A fixed number of learned latents summarise any number of patches.

    IDEFICS: LayerNorm, ReLU MLP, width = vision width. Idefics2: RMSNorm, SwiGLU MLP, GQA, width = text width."""

    def __init__(self, dim: int, cfg: ConnectorConfig, rms: bool):
        super().__init__()
        eps = cfg.norm_eps

        def norm(d):
            return RMSNorm(d, eps) if rms else nn.LayerNorm(d, eps=eps)

        def mlp():
            hidden = dim * cfg.mlp_ratio
            if rms:
                return SwiGLU(dim, hidden, act=cfg.perceiver_act)
            return MLP(dim, hidden, act="relu", bias=False)

        self.latents = nn.Parameter(torch.ones(cfg.num_latents, dim))
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg, norm, mlp()) for _ in range(cfg.depth))
        self.norm = norm(dim)

    def forward(self, context: torch.Tensor, patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = context.shape[0]
        latents = self.latents[None].expand(n, -1, -1).to(context.dtype)
        mask = None
        if patch_mask is not None:
            keep = torch.cat([patch_mask.reshape(n, -1), patch_mask.new_ones(n, latents.shape[1])], dim=1)
            mask = keep[:, None, None, :].bool()
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.norm(latents)


class Idefics2Connector(nn.Module):
    """SwiGLU projection to the text width, then an RMSNorm/GQA perceiver (64 latents in Idefics2-8B)."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.proj = SwiGLU(cfg.in_dim, cfg.hidden_dim, cfg.out_dim, act=cfg.act)
        self.perceiver = PerceiverResampler(cfg.out_dim, cfg, rms=True)

    def forward(self, x, patch_mask=None):
        return self.perceiver(self.proj(x), patch_mask)


class IdeficsPerceiver(PerceiverResampler):
    def __init__(self, cfg: ConnectorConfig):
        super().__init__(cfg.in_dim, cfg, rms=False)


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, h*w, D] -> [N, h*w / factor^2, D * factor^2]: each factor x factor block of patches becomes one token
    (same element order as Idefics3's reference, so checkpoint weights line up)."""
    n, seq, d = x.shape
    side = int(seq**0.5)
    if side * side != seq or side % factor:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {factor}, got {seq} patches")
    x = x.view(n, side, side // factor, d * factor).permute(0, 2, 1, 3)
    x = x.reshape(n, side // factor, side // factor, d * factor * factor).permute(0, 2, 1, 3)
    return x.reshape(n, seq // factor**2, d * factor**2)


class PixelShuffleProjector(nn.Module):
    """Idefics3 / SmolVLM: pixel shuffle, then a bias-free Linear."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.factor = cfg.scale_factor
        self.proj = nn.Linear(cfg.in_dim * cfg.scale_factor**2, cfg.out_dim, bias=False)

    def forward(self, x, patch_mask=None):
        return self.proj(pixel_shuffle(x, self.factor))


class PatchMerger(nn.Module):
    """Qwen2-VL: norm each patch, concatenate each merge x merge block (contiguous in the processor's patch order),
    then Linear-GELU-Linear to the text width. [P, D] -> [P / merge^2, out]."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.width = cfg.in_dim * cfg.scale_factor**2
        self.norm = RMSNorm(cfg.in_dim, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.in_dim,
                                                                                                    eps=cfg.norm_eps)
        self.mlp = MLP(self.width, self.width, cfg.out_dim, act="gelu")

    def forward(self, x, patch_mask=None):
        return self.mlp(self.norm(x).reshape(-1, self.width))


class PooledProjector(nn.Module):
    """Gemma 3: the patch grid average-pooled by `scale_factor` (64x64 -> 16x16 = 256 tokens), a Gemma RMSNorm,
    then a bias-free projection stored as an [in, out] matrix."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.factor = cfg.scale_factor
        self.norm = GemmaRMSNorm(cfg.in_dim, cfg.norm_eps)
        self.weight = nn.Parameter(torch.zeros(cfg.in_dim, cfg.out_dim))

    def forward(self, x, patch_mask=None):
        n, seq, d = x.shape
        side = int(seq**0.5)
        if side * side != seq or side % self.factor:
            raise ValueError(f"pooling needs a square grid divisible by {self.factor}, got {seq} patches")
        grid = x.transpose(1, 2).reshape(n, d, side, side)
        pooled = torch.nn.functional.avg_pool2d(grid, self.factor, self.factor).flatten(2).transpose(1, 2)
        return torch.matmul(self.norm(pooled), self.weight).to(x.dtype)


CONNECTORS = {
    "pooled": PooledProjector,
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "identity": lambda cfg: Identity(),
    "perceiver": IdeficsPerceiver,
    "idefics2": Idefics2Connector,
    "pixel_shuffle": PixelShuffleProjector,
    "patch_merger": PatchMerger,
}


def build_connector(cfg: ConnectorConfig) -> nn.Module:
    try:
        return CONNECTORS[cfg.kind](cfg)
    except KeyError:
        raise ValueError(f"unknown connector kind {cfg.kind!r}; known: {sorted(CONNECTORS)}") from None
