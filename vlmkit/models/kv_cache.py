"""The keys/values caches of the decoder.

- `KVCache`: keys/values per layer grown by concatenation (the reference; any batch, any length).
- `StaticKVCache`: preallocated buffers written in place. Eager steps read views of the filled part (same
  numbers as `KVCache`); `TextDecoder.decode_step` can instead read whole buffers with a key mask, which keeps
  every shape fixed for torch.compile. Buffers grow by doubling, so a large `max_new_tokens` costs nothing
  until it is used.

The image-feature and prefix caches and the fast decode path are generation's (`vlmkit.generation`).
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Keys/values per decoder layer, grown by concatenation; also what cross-attention needs on decode steps."""

    def __init__(self):
        self.keys: list[Optional[torch.Tensor]] = []
        self.values: list[Optional[torch.Tensor]] = []
        self.cross_context: Optional[torch.Tensor] = None  # [B, L, C] image features (IDEFICS)
        self.cross_mask_last: Optional[torch.Tensor] = None  # [B, 1, num_images]: last token's image row
        self.rope_deltas: Optional[torch.Tensor] = None  # [B] M-RoPE: position - real tokens before (Qwen2-VL)
        self.cross_kv: dict = {}  # Mllama: block -> (context, keys, values), projected once per context

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def select(self, rows) -> "KVCache":
        """Keep only the given batch rows (e.g. drop finished sequences)."""
        out = KVCache()
        out.keys = [k[rows] for k in self.keys]
        out.values = [v[rows] for v in self.values]
        if self.cross_context is not None:
            out.cross_context = self.cross_context[rows]
            out.cross_mask_last = self.cross_mask_last[rows]
        out.rope_deltas = None if self.rope_deltas is None else self.rope_deltas[rows]
        return out


class StaticKVCache:
    """Per layer one [B, Hkv, capacity, D] key and value buffer, allocated at the first write (shapes come from
    the keys), written in place. `length` advances when the last layer has written, so every layer of one
    forward writes at the same offset. `token_ids` records what was fed (the generation loop calls
    `record`), which is what a prefix-cache entry needs."""

    def __init__(self, num_layers: int, max_length: int, initial: int = 256, multiple: int = 1):
        self.num_layers, self.max_length = num_layers, max_length
        self.initial, self.multiple = initial, multiple  # multiple > 1 rounds capacities (fewer compiled shapes)
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self._length = 0
        self.token_ids: Optional[torch.Tensor] = None  # [B, capacity] long
        self.cross_context: Optional[torch.Tensor] = None
        self.cross_mask_last: Optional[torch.Tensor] = None
        self.rope_deltas: Optional[torch.Tensor] = None  # [B] (see KVCache)
        self.cross_kv: dict = {}

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def _round(self, n: int) -> int:
        return -(-n // self.multiple) * self.multiple

    def _capacity_for(self, needed: int) -> int:
        return self._round(min(max(needed, 2 * self.capacity, self.initial), self.max_length))

    def reserve(self, needed: int, exact: bool = False) -> None:
        """Room for `needed` tokens in every allocated layer (capacity doubles, capped at max_length).
        exact: capacity becomes `needed` rounded up to `multiple`, whatever it was (fixed compiled shapes)."""
        if needed > self.max_length:
            raise ValueError(f"the cache holds at most {self.max_length} tokens, {needed} needed")
        if self.keys[0] is None:
            return
        if exact:
            cap = self._round(needed)
            if cap == self.capacity:
                return
        elif needed <= self.capacity:
            return
        else:
            cap = self._capacity_for(needed)
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i], self.values[i] = self._grow(self.keys[i], cap), self._grow(self.values[i], cap)
        if self.token_ids is not None:
            self.token_ids = self._grow_ids(self.token_ids, cap)

    def _grow(self, old: torch.Tensor, cap: int) -> torch.Tensor:
        b, h, _, d = old.shape
        # zeros, not empty: whole-buffer attention multiplies masked slots by 0, and 0 * NaN garbage is NaN
        new = old.new_zeros(b, h, cap, d)
        new[:, :, : self._length] = old[:, :, : self._length]
        return new

    @staticmethod
    def _grow_ids(old: torch.Tensor, cap: int) -> torch.Tensor:
        new = old.new_zeros(old.shape[0], cap)
        n = min(cap, old.shape[1])
        new[:, :n] = old[:, :n]
        return new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, t = self._length, k.shape[2]
        self.reserve(start + t)
        if self.keys[layer] is None:  # first write of this layer: layer 0's capacity, or a fresh one
            cap = self.capacity if self.keys[0] is not None else self._capacity_for(start + t)
            self.keys[layer] = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
            self.values[layer] = v.new_zeros(v.shape[0], v.shape[1], cap, v.shape[3])
        self.keys[layer][:, :, start : start + t] = k
        self.values[layer][:, :, start : start + t] = v
        if layer == self.num_layers - 1:
            self._length += t
        return self.keys[layer][:, :, : start + t], self.values[layer][:, :, : start + t]

    def record(self, ids: torch.Tensor) -> None:
        """Token ids [B, t] just fed (called after the forward that wrote them)."""
        end = self._length
        if self.token_ids is None:
            self.token_ids = ids.new_zeros(ids.shape[0], max(self.capacity, end))
        elif self.token_ids.shape[1] < end:
            self.token_ids = self._grow_ids(self.token_ids, max(self.capacity, end))
        self.token_ids[:, end - ids.shape[1] : end] = ids

    def advance(self, t: int) -> None:
        """Count `t` tokens written directly into the buffers (the whole-buffer decode step)."""
        self._length += t

    def select(self, rows, start: int = 0) -> "StaticKVCache":
        """Keep only the given batch rows, and only the columns from `start` on (columns before it are left
        padding in every kept row: the caller checks)."""
        out = StaticKVCache(self.num_layers, self.max_length, self.initial, self.multiple)
        out.keys = [None if k is None else k[rows][:, :, start:] for k in self.keys]
        out.values = [None if v is None else v[rows][:, :, start:] for v in self.values]
        out._length = self._length - start
        out.token_ids = None if self.token_ids is None else self.token_ids[rows][:, start:]
        if self.cross_context is not None:
            out.cross_context = self.cross_context[rows]
            out.cross_mask_last = self.cross_mask_last[rows]
        out.rope_deltas = None if self.rope_deltas is None else self.rope_deltas[rows]
        return out

    @classmethod
    def from_prefix(cls, keys: list, values: list, ids: torch.Tensor, max_length: int,
                    multiple: int = 1) -> "StaticKVCache":
        """A cache already holding a prefix: keys/values [B, Hkv, L, D] per layer, ids [B, L]."""
        cache = cls(len(keys), max_length, multiple=multiple)
        n = ids.shape[1]
        cap = cache._round(min(max(n + 1, cache.initial), max_length))
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.keys[i] = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
            cache.values[i] = v.new_zeros(v.shape[0], v.shape[1], cap, v.shape[3])
            cache.keys[i][:, :, :n] = k[:, :, :n]
            cache.values[i][:, :, :n] = v[:, :, :n]
        cache.token_ids = ids.new_zeros(ids.shape[0], cap)
        cache.token_ids[:, :n] = ids
        cache._length = n
        return cache

    @classmethod
    def stack_left_padded(cls, caches: list, masks: list) -> tuple["StaticKVCache", torch.Tensor]:
        """One cache holding the rows of several StaticKVCaches (each [b_i rows, length_i columns] with its
        attention mask [b_i, length_i]), every part right-aligned at the longest length: shorter parts get left
        padding (mask 0), as a left-padded batch has. Cross-attention contexts (IDEFICS) are padded to the most
        images with all-zero features that no token sees. Token ids are not kept. -> (cache, mask)"""
        length = max(c.length for c in caches)
        first = caches[0]
        out = cls(first.num_layers, first.max_length, first.initial, first.multiple)
        cap = out._round(min(max(length + 1, out.initial), out.max_length))
        for i in range(first.num_layers):
            for name in ("keys", "values"):
                parts = [getattr(c, name)[i] for c in caches]
                ref = parts[0]
                buf = ref.new_zeros(sum(p.shape[0] for p in parts), ref.shape[1], cap, ref.shape[3])
                row = 0
                for c, p in zip(caches, parts):
                    buf[row : row + p.shape[0], :, length - c.length : length] = p[:, :, : c.length]
                    row += p.shape[0]
                getattr(out, name)[i] = buf
        out._length = length
        mask = torch.cat([torch.nn.functional.pad(m, (length - m.shape[1], 0)) for m in masks])
        if any(c.rope_deltas is not None for c in caches):
            out.rope_deltas = torch.cat([c.rope_deltas if c.rope_deltas is not None else
                                         torch.zeros(m.shape[0], dtype=torch.long, device=m.device)
                                         for c, m in zip(caches, masks)])
        with_images = [c for c in caches if c.cross_context is not None]
        if with_images:
            ref = with_images[0]
            per_image = ref.cross_context.shape[1] // ref.cross_mask_last.shape[-1]
            images = max(c.cross_mask_last.shape[-1] for c in with_images)
            contexts, last = [], []
            for c, m in zip(caches, masks):
                b = m.shape[0]
                ctx, sees = c.cross_context, c.cross_mask_last
                if ctx is None:  # a prompt without images: no image to see
                    ctx = ref.cross_context.new_zeros(b, 0, ref.cross_context.shape[2])
                    sees = ref.cross_mask_last.new_zeros(b, 1, 0)
                contexts.append(torch.nn.functional.pad(ctx, (0, 0, 0, images * per_image - ctx.shape[1])))
                last.append(torch.nn.functional.pad(sees, (0, images - sees.shape[-1])))
            out.cross_context, out.cross_mask_last = torch.cat(contexts), torch.cat(last)
        return out, mask
