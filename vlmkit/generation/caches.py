"""The caches `VLM.generate` keeps between calls.

- `ImageFeatureCache`: connector outputs per image crop, keyed by a digest of the crop's pixels.
- `PrefixCache`: the keys/values of earlier prompts (+ answers), reused when a new prompt starts with the same
  tokens and the same images -- the second turn of a chat re-reads neither the image nor the history.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ImageFeatureCache", "PrefixCache", "PrefixEntry", "common_prefix", "crop_digest", "crop_starts"]


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


def image_run_starts(ids: torch.Tensor, image_token_id: Optional[int]) -> tuple:
    """Index of the first token of every run of image tokens (Qwen2-VL: one run per image, of any length)."""
    if image_token_id is None:
        return ()
    is_image = (ids == image_token_id).long()
    starts = (is_image - torch.nn.functional.pad(is_image, (1, 0))[:-1]) == 1
    return tuple(starts.nonzero().flatten().tolist())


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
