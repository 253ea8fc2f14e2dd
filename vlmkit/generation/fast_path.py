"""The static-cache fast path of the decode loop: decode steps through `TextDecoder.decode_step` on a
`StaticKVCache` (vlmkit's own decoders), and the default cache of a model."""

from __future__ import annotations

import torch

from ..models.kv_cache import KVCache, StaticKVCache
from ..models.text import TextDecoder

__all__ = ["COMPILED_CAPACITY_MULTIPLE", "FastSteps", "fast_decoder", "new_cache"]


def fast_decoder(model):
    """The vlmkit TextDecoder whose `decode_step` can run this model's decode steps, or None (foreign models,
    gated cross-attention, Gemma's decoder options): a splice-merge VLM's decode step is its text decoder's."""
    text = model if isinstance(model, TextDecoder) else getattr(model, "text", None)
    if not isinstance(text, TextDecoder) or text.cross_blocks is not None or not text.plain:
        return None
    if text is not model and getattr(getattr(model, "cfg", None), "merge", None) != "splice":
        return None
    return text


def new_cache(model, max_length: int):
    """The default cache for `model`: a StaticKVCache for vlmkit decoders, else the concatenating KVCache."""
    text = model if isinstance(model, TextDecoder) else getattr(model, "text", None)
    if isinstance(text, TextDecoder):
        return StaticKVCache(len(text.layers), max_length)
    return KVCache()


COMPILED_CAPACITY_MULTIPLE = 256  # compiled decode steps see whole buffers: round capacities to few shapes


class FastSteps:
    """The generation loop's decode steps through `TextDecoder.decode_step` on a StaticKVCache: positions, write
    slot and key mask are tensors updated in place (no per-step mask or position rebuilding, no VLM wrapper).
    Same numbers as the model's forward; compiled decoders get whole, fixed-shape buffers."""

    def __init__(self, text, cache, attention_mask):
        self.text, self.attention_mask, self.ready = text, attention_mask, False
        self.usable = text is not None and isinstance(cache, StaticKVCache)

    def start(self, cache, total_len: int) -> None:
        if not self.usable or cache.cross_context is not None:
            return
        self.cache, n = cache, cache.length
        self.compiled = self.text.decode_compiled
        if self.compiled:  # one capacity for the whole answer, rounded so few shapes get compiled
            cache.multiple = max(cache.multiple, COMPILED_CAPACITY_MULTIPLE)
            cache.reserve(total_len, exact=True)
        mask = self.attention_mask
        self.position = mask.sum(-1, keepdim=True).to(torch.long)  # new token's position = real tokens before
        if cache.rope_deltas is not None:  # M-RoPE prompts: images take fewer positions than tokens
            self.position += cache.rope_deltas[:, None].to(self.position.device)
        self.index = torch.tensor([n], dtype=torch.long, device=mask.device)
        self.key_mask = torch.zeros(mask.shape[0], max(cache.capacity, n + 1), dtype=torch.bool, device=mask.device)
        self.key_mask[:, : mask.shape[1]] = mask.bool()
        self.ready = True

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        n = cache.length
        if not self.compiled:
            cache.reserve(n + 1)
            if self.key_mask.shape[1] < cache.capacity:
                grown = self.key_mask.new_zeros(self.key_mask.shape[0], cache.capacity)
                grown[:, : self.key_mask.shape[1]] = self.key_mask
                self.key_mask = grown
        logits = self.text.decode_step(ids, self.position, self.index, self.key_mask, cache.keys, cache.values,
                                       length=None if self.compiled else n + 1)
        cache.advance(1)
        return logits
