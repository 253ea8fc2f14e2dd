"""Caches of the generation loop.

- `KVCache`: keys/values per layer grown by concatenation (the reference; any batch, any length).
- `StaticKVCache`: preallocated buffers written in place. Eager steps read views of the filled part (same
  numbers as `KVCache`); `TextDecoder.decode_step` can instead read whole buffers with a key mask, which keeps
  every shape fixed for torch.compile. Buffers grow by doubling, so a large `max_new_tokens` costs nothing
  until it is used.
- `ImageFeatureCache`: connector outputs per image crop, keyed by a digest of the crop's pixels.
- `PrefixCache`: the keys/values of earlier prompts (+ answers), reused when a new prompt starts with the same
  tokens and the same images -- the second turn of a chat re-reads neither the image nor the history.
- `FastSteps`: how the generation loop runs decode steps on a StaticKVCache (`TextDecoder.decode_step`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch


class KVCache:
    """Keys/values per decoder layer, grown by concatenation; also what cross-attention needs on decode steps."""

    def __init__(self):
        self.keys: list[Optional[torch.Tensor]] = []
        self.values: list[Optional[torch.Tensor]] = []
        self.cross_context: Optional[torch.Tensor] = None  # [B, L, C] image features (IDEFICS)
        self.cross_mask_last: Optional[torch.Tensor] = None  # [B, 1, num_images]: last token's image row

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


def stack_left_padded(caches: list, masks: list) -> tuple["StaticKVCache", torch.Tensor]:
    """One cache holding the rows of several StaticKVCaches (each [b_i rows, length_i columns] with its attention
    mask [b_i, length_i]), every part right-aligned at the longest length: shorter parts get left padding (mask
    0), as a left-padded batch has. Cross-attention contexts (IDEFICS) are padded to the most images with
    all-zero features that no token sees. Token ids are not kept."""
    length = max(c.length for c in caches)
    first = caches[0]
    out = StaticKVCache(first.num_layers, first.max_length, first.initial, first.multiple)
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


# ------------------------------------------------------------------------------------------ fast decode

def fast_decoder(model):
    """The vlmkit TextDecoder whose `decode_step` can run this model's decode steps, or None (foreign models,
    gated cross-attention): a splice-merge VLM's decode step is its text decoder's."""
    from .text import TextDecoder

    text = model if isinstance(model, TextDecoder) else getattr(model, "text", None)
    if not isinstance(text, TextDecoder) or text.cross_blocks is not None:
        return None
    if text is not model and getattr(getattr(model, "cfg", None), "merge", None) != "splice":
        return None
    return text


def new_cache(model, max_length: int):
    """The default cache for `model`: a StaticKVCache for vlmkit decoders, else the concatenating KVCache."""
    from .text import TextDecoder

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
        self.compiled = self.text._compiled_decode is not None
        if self.compiled:  # one capacity for the whole answer, rounded so few shapes get compiled
            cache.multiple = max(cache.multiple, COMPILED_CAPACITY_MULTIPLE)
            cache.reserve(total_len, exact=True)
        mask = self.attention_mask
        self.position = mask.sum(-1, keepdim=True).to(torch.long)  # new token's position = real tokens before
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


# ------------------------------------------------------------------------------------------ image features

def crop_digest(pixels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> str:
    """Content key of one preprocessed crop: its pixels (and pixel mask), shape and dtype."""
    h = hashlib.blake2b(digest_size=16)
    for t in (pixels, mask):
        if t is None:
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


class ImageFeatureCache:
    """digest -> features [tokens, width] of one crop, least recently used first out. Features depend on the
    weights too: the owner clears the cache when they change (quantize, load)."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Optional[torch.Tensor]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# ------------------------------------------------------------------------------------------ prefix (KV) cache

@dataclass(eq=False)  # identity, not tensor comparison
class PrefixEntry:
    ids: torch.Tensor  # [L] tokens whose keys/values are stored
    crops: tuple  # digests of the image crops spliced into these tokens, in order
    crop_starts: tuple  # index in `ids` of each crop's first image token
    keys: list  # per layer [1, Hkv, L, D]
    values: list


def crop_starts(ids: torch.Tensor, image_token_id: Optional[int], tokens_per_crop: int) -> tuple:
    """Index of the first image token of every crop (each crop fills `tokens_per_crop` consecutive slots)."""
    if image_token_id is None or tokens_per_crop <= 0:
        return ()
    slots = (ids == image_token_id).nonzero().flatten()
    return tuple(slots[::tokens_per_crop].tolist())


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


class PrefixCache:
    """A few (ids, images) -> keys/values entries for batch-1 generation. `lookup` returns the entry and the
    number of tokens that can be reused: the common token prefix, cut before the first image crop that differs,
    and at least one token short of the new prompt (its last position must run to give logits)."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._entries: list[PrefixEntry] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: torch.Tensor, crops: tuple, starts: tuple) -> tuple[Optional[PrefixEntry], int]:
        best, best_n = None, 0
        with self._lock:
            entries = list(self._entries)
        for entry in entries:
            n = min(common_prefix(entry.ids, ids), ids.numel() - 1)
            for i, start in enumerate(entry.crop_starts):
                if start >= n:
                    break
                if i >= len(crops) or crops[i] != entry.crops[i] or starts[i] != start:
                    n = start  # features differ from this crop on: its tokens' keys/values do too
                    break
            if n > best_n:
                best, best_n = entry, n
        if best is not None:
            with self._lock:
                if best in self._entries:  # most recently used last
                    self._entries.remove(best)
                    self._entries.append(best)
        return best, best_n

    def store(self, entry: PrefixEntry) -> None:
        with self._lock:
            # an entry whose tokens are a prefix of the new one is superseded by it
            self._entries = [e for e in self._entries
                             if not (e.ids.numel() <= entry.ids.numel() and common_prefix(e.ids, entry.ids) == e.ids.numel()
                                     and e.crops == entry.crops[: len(e.crops)])]
            self._entries.append(entry)
            del self._entries[: max(0, len(self._entries) - self.max_entries)]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
