"""One Llama/Mistral-style decoder for every family: RMSNorm, RoPE from explicit positions, grouped-query
attention through scaled_dot_product_attention, SwiGLU, a KV cache, and optional gated cross-attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CrossAttnConfig, TextConfig
from .attention_masks import add_groups, sliding
from .cross_attn import cross_blocks
from .fused import decode_projections
from .kv_cache import KVCache
from .layers import (
    GemmaRMSNorm, RMSNorm, SwiGLU, apply_rope, attention, merge_heads, rope_cos_sin, rope_inv_freq, split_heads,
)
from .rope import mrope_cos_sin


def norm_for(cfg: TextConfig):
    return GemmaRMSNorm if cfg.gemma_norm else RMSNorm


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    cache: Optional[KVCache] = None


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        qkv_bias = bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = norm_for(cfg)(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = norm_for(cfg)(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.sliding, self.scale, self.softcap = cfg.is_sliding(layer), cfg.attn_scale, cfg.attn_softcap

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache]):
        q = split_heads(self.q_proj(x), self.heads, self.head_dim)
        k = split_heads(self.k_proj(x), self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = split_heads(self.v_proj(x), self.kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.o_proj(merge_heads(grouped_attention(q, k, v, mask, self.scale, self.softcap)))


def grouped_attention(q, k, v, mask, scale=None, softcap=None):
    """Grouped-query attention without repeating keys/values: the query heads that share a key/value head are
    folded into its query rows (q [B, H, T, D] -> [B, Hkv, rep*T, D]). Repeating the cache instead copies all of
    it, every layer, every decode step (measured: most of the attention time at a few hundred tokens).
    mask bool [B, 1, T, S] (True = attend) or None."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    if hkv == h:
        return attention(q, k, v, mask, scale, softcap)
    rep = h // hkv
    q = q.reshape(b, hkv, rep * t, d)
    if mask is not None and (t > 1 or mask.shape[1] != 1):
        mask = mask.repeat(1, 1, rep, 1) if mask.shape[1] == 1 else mask.reshape(b, hkv, rep * t, -1)
    return attention(q, k, v, mask, scale, softcap).reshape(b, h, t, d)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        norm = norm_for(cfg)
        self.attn_norm = norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = SelfAttention(cfg, layer)
        self.mlp_norm = norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, act=cfg.act, bias=cfg.mlp_bias)
        # Gemma 2/3 also normalise each block's output before the residual add
        self.post_attn_norm = norm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.post_norms else None
        self.post_mlp_norm = norm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.post_norms else None

    def forward(self, x, cos, sin, mask, cache):
        if self.post_attn_norm is not None:
            x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, mask, cache))
            return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def positions_from_mask(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Position of each of the last `new_tokens` tokens = count of real tokens before it (left padding safe)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -new_tokens:]


def causal_mask(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """bool [B, 1, T, S]: token i (at absolute index S - T + i) sees real keys at or before it.
    A padding query sees itself only, so its softmax never runs over an empty row."""
    b, s = attention_mask.shape
    q_idx = torch.arange(s - new_tokens, s, device=attention_mask.device)
    k_idx = torch.arange(s, device=attention_mask.device)
    causal = k_idx[None, :] <= q_idx[:, None]  # [T, S]
    mask = causal[None] & attention_mask.bool()[:, None, :]
    mask = mask | (k_idx[None, :] == q_idx[:, None])[None]
    return mask[:, None]


class TextDecoder(nn.Module):
    def __init__(self, cfg: TextConfig, cross_attn: Optional[CrossAttnConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size + cfg.input_only_tokens, cfg.hidden_size)
        # IDEFICS keeps added tokens in a separate table (ids >= vocab_size) so the base vocabulary can stay frozen.
        self.embed_tokens_extra = (
            nn.Embedding(cfg.additional_vocab_size, cfg.hidden_size) if cfg.additional_vocab_size else None
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        # cross_at[i]: the cross-attention blocks that run before self-attention layer i (i == num_layers: after all)
        self.cross_blocks, positions = cross_blocks(cfg, cross_attn) if cross_attn else (None, [])
        self.cross_at = [[k for k, p in enumerate(positions) if p == i] for i in range(cfg.num_layers + 1)]
        self.norm = norm_for(cfg)(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head_extra = (
            nn.Linear(cfg.hidden_size, cfg.additional_vocab_size, bias=False)
            if cfg.additional_vocab_size and not cfg.tie_word_embeddings
            else None
        )
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.register_buffer("inv_freq_local", self._inv_freq(local=True), persistent=False)

    def _inv_freq(self, local: bool = False) -> torch.Tensor:
        """RoPE frequencies: Llama 3 scaling and Gemma's linear factor on the global layers; Gemma 3's local layers
        have their own theta."""
        c = self.cfg
        if local:
            return rope_inv_freq(c.head_dim, c.rope_local_theta or c.rope_theta)
        return rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling) / c.rope_factor

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device and loading weights)."""
        device = self.embed_tokens.weight.device
        self.inv_freq = self._inv_freq().to(device)
        self.inv_freq_local = self._inv_freq(local=True).to(device)

    @property
    def plain(self) -> bool:
        """A Llama-style decoder (what decode_step computes); Gemma's options go through forward."""
        c = self.cfg
        return not (c.gemma_norm or c.embed_scale or c.post_norms or c.qk_norm or c.attn_scale or c.attn_softcap
                    or c.final_softcap or c.sliding_window or c.position_offset or c.rope_factor != 1)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.embed_scale:  # Gemma: sqrt(hidden) rounded to the table's dtype, as transformers
            w = self.embed_tokens.weight
            return self.embed_tokens(input_ids) * torch.tensor(self.cfg.hidden_size**0.5).to(w.dtype)
        if self.embed_tokens_extra is None:
            return self.embed_tokens(input_ids)
        base = self.cfg.vocab_size
        is_extra = input_ids >= base
        out = self.embed_tokens(input_ids.masked_fill(is_extra, 0))
        extra = self.embed_tokens_extra((input_ids - base).clamp(min=0))
        return torch.where(is_extra[..., None], extra, out)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens if self.lm_head is None else self.lm_head
        # quantized tables (vlmkit.models.quant) project themselves: their weight is not a float matrix
        logits = table.project(h) if hasattr(table, "project") else F.linear(h, table.weight)
        if self.cfg.additional_vocab_size:
            w = self.embed_tokens_extra.weight if self.lm_head_extra is None else self.lm_head_extra.weight
            logits = torch.cat([logits, F.linear(h, w)], dim=-1)
        if self.cfg.final_softcap:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cross_context: Optional[torch.Tensor] = None,
        cross_mask: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
        groups: Optional[torch.Tensor] = None,
        groups_in_window: bool = True,
    ) -> ModelOutput:
        """cross_context [B, L, C] and cross_mask bool [B, 1, T, L] feed the gated cross-attention blocks.
        logits_to_keep > 0 computes logits for the last positions only (generation needs one).
        groups [B, T]: new tokens of one group (>= 0) see each other both ways (attention_masks.py)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=x.device)
        if attention_mask.shape[1] != past + t:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens, expected {past + t} "
                f"({past} cached + {t} new)"
            )
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, t) + self.cfg.position_offset
        if position_ids.dim() == 3:  # M-RoPE [3, B, T] (Qwen2-VL); equal rows are the ordinary RoPE
            cos, sin = mrope_cos_sin(position_ids, self.inv_freq, self.cfg.mrope_section, x.dtype)
        else:
            cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        mask = causal_mask(attention_mask, t)
        if self.cfg.sliding_window:
            local = sliding(mask, self.cfg.sliding_window), *rope_cos_sin(position_ids, self.inv_freq_local, x.dtype)
        if groups is not None:
            mask = add_groups(mask, groups, attention_mask)
            if self.cfg.sliding_window:  # Gemma 3's window bounds the groups too, PaliGemma 2's does not
                window = sliding(mask, self.cfg.sliding_window) if groups_in_window else add_groups(
                    local[0], groups, attention_mask)
                local = window, *local[1:]
        for i, layer in enumerate([*self.layers, None]):
            for k in self.cross_at[i] if cross_context is not None else ():
                x = self.cross_blocks[k](x, cross_context, cross_mask, cache)
            if layer is None:
                break
            if layer.attn.sliding:
                x = layer(x, local[1], local[2], local[0], cache)
            else:
                x = layer(x, cos, sin, mask, cache)
        x = self.norm(x)
        logits = self.head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return ModelOutput(logits=logits, loss=loss, cache=cache)

    # ---- fast decode -------------------------------------------------------------------------------------
    def decode_step(self, input_ids, position_ids, index, key_mask, keys, values, length: Optional[int] = None):
        """One new token per row written into a StaticKVCache's buffers; returns logits [B, V].

        input_ids / position_ids [B, 1]; index long [1] = the cache slot to write; key_mask bool [B, capacity]
        (True = a real token; this step's slot is set here); keys/values: the cache's per-layer buffers.
        length (eager) attends over the filled part only; None (compiled) attends over whole buffers, masked,
        so every shape is fixed. position_ids and index are advanced in place for the next step.
        Self-attention decoders only (gated cross-attention goes through forward)."""
        if self._compiled_decode is not None and length is None:
            return self._compiled_decode(input_ids, position_ids, index, key_mask, keys, values)
        return self._decode_step(input_ids, position_ids, index, key_mask, keys, values, length)

    def _decode_step(self, input_ids, position_ids, index, key_mask, keys, values, length=None):
        x = self.embed(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        key_mask.index_fill_(1, index, True)
        mask = (key_mask if length is None else key_mask[:, :length])[:, None, None, :]
        fused = decode_projections(self) if self._fuse else None
        for i, layer in enumerate(self.layers):
            a, f = layer.attn, None if fused is None else fused[i]
            h = layer.attn_norm(x)
            q, k, v = (a.q_proj(h), a.k_proj(h), a.v_proj(h)) if f is None or f.qkv is None else f.qkv(h)
            q = apply_rope(split_heads(q, a.heads, a.head_dim), cos, sin)
            k = apply_rope(split_heads(k, a.kv_heads, a.head_dim), cos, sin)
            v = split_heads(v, a.kv_heads, a.head_dim)
            keys[i].index_copy_(2, index, k)
            values[i].index_copy_(2, index, v)
            kk, vv = (keys[i], values[i]) if length is None else (keys[i][:, :, :length], values[i][:, :, :length])
            o = merge_heads(grouped_attention(q, kk, vv, mask))
            x = x + (a.o_proj(o) if f is None or f.o is None else f.o(o)[0])
            if f is None or f.gate_up is None or f.down is None:
                x = x + layer.mlp(layer.mlp_norm(x))
            else:
                gate, up = f.gate_up(layer.mlp_norm(x))
                x = x + f.down(layer.mlp.act(gate) * up)[0]
        logits = self.head(self.norm(x))[:, -1]
        position_ids.add_(1)
        index.add_(1)
        return logits

    _compiled_decode = None
    # Decode steps run int4 q/k/v and gate/up as fused kernel calls (models/fused.py), on the AVX2 kernel where it runs.
    _fuse = True

    @property
    def decode_compiled(self) -> bool:
        """Whether `compile_decode` ran: whole-buffer decode steps then take fixed shapes."""
        return self._compiled_decode is not None

    def compile_decode(self, **options) -> None:
        """torch.compile the whole-buffer decode step (fixed shapes: one compilation per batch size and cache
        capacity). Weights are read as they are at call time, so quantize first."""
        options.setdefault("fullgraph", True)
        options.setdefault("dynamic", False)
        if self._fuse:
            decode_projections(self)  # fused before tracing: the compiled step reads the fused groups as built
        self._compiled_decode = torch.compile(self._decode_step, **options)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 (as transformers computes it)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
