"""LLaVA-NeXT processing rules (transformers' LlavaNextProcessor).

An image's `<image>` count depends on its size: the base tile's patch grid, plus the anyres grid's features left
after unpadding to the image's aspect ratio, plus one newline per remaining row (LlavaNextProcessor.
_get_number_of_features). The batch: pixel_values [N, max_tiles, 3, S, S] (all rows' images in order, tiles padded
with zero tiles) and image_sizes [N, 2]."""

from __future__ import annotations

import torch

from ...models.anyres_grid import select_best_resolution, unpadded_size
from ..batching import CollateError, EncodedRow, pad_tokens
from ..prompts import PromptRules, fill_placeholders, segments_text
from .llava import LlavaFormat

# As llava-hf/llava-v1.6-mistral-7b-hf's template (the checkpoints' own templates are used when present).
MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '<<SYS>>\n' + c['text'] + '\n<</SYS>>\n\n' }}{% endfor %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ ' ' + c['text'] + (eos_token or '') }}{% endfor %}{% endif %}{% endfor %}"
)


def llava_next_tokens(rules: PromptRules, height: int, width: int, tile_h: int, tile_w: int, pinpoints) -> int:
    """`<image>` tokens for an image of height x width whose tiles are tile_h x tile_w (LlavaNextProcessor)."""
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    ph, pw = tile_h // rules.patch_size, tile_w // rules.patch_size
    _, kept_h, _, kept_w = unpadded_size(height, width, ph * (best_h // tile_h), pw * (best_w // tile_w))
    n = kept_h * kept_w + kept_h + ph * pw + rules.num_additional_image_tokens
    return n - 1 if rules.vision_feature_select_strategy == "default" else n


class LlavaNextFormat(LlavaFormat):
    """LLaVA-NeXT: LLaVA's prompt rules with a count per image; images are a flat list of tiled images."""

    name = "llava_next"
    template = MISTRAL_TEMPLATE

    def expected_tokens(self, rules, cfg):
        if rules.patch_size != cfg.vision.patch_size:
            raise ValueError(f"processor patch_size={rules.patch_size} but the vision tower's is "
                             f"{cfg.vision.patch_size}")
        return None  # the count varies with each image's size

    def expand(self, segments, rules, images, index, special, expected=None):
        counts = images.get("num_images", []) if images else []
        n = counts[index] if counts else 0
        tokens = []
        if n:
            start = sum(counts[:index])
            tile_h, tile_w = images["pixel_values"].shape[-2:]
            for h, w in images["image_sizes"][start:start + n].tolist():
                tokens.append(llava_next_tokens(rules, h, w, tile_h, tile_w, images["grid_pinpoints"]))
        return fill_placeholders(segments_text(segments, rules.image_token), rules.image_token,
                                 [rules.image_token * k for k in tokens])

    def image_cost(self, rules, settings):
        crop = getattr(settings, "crop_size", None) or {"height": 336, "width": 336}
        pins = getattr(settings, "image_grid_pinpoints", None) or [[crop["height"], crop["width"]]]
        h, w = max(pins, key=lambda p: p[0] * p[1])  # the largest grid: an upper bound
        return llava_next_tokens(rules, h, w, crop["height"], crop["width"], pins)

    def row(self, ids, images, index, image_token_id, eos_token_id):
        out = EncodedRow(ids)
        if "pixel_values" in images:
            counts = images["num_images"]
            start = sum(counts[:index])
            sizes = images["image_sizes"][start:start + counts[index]]
            tiles = images["pixel_values"][start:start + counts[index]]
            out.pixels, out.image_sizes = tiles, sizes  # the tile padding is redone over the batch in pixel_batch
        return out

    def pixel_batch(self, rows):
        parts = [(r.pixels, r.image_sizes) for r in rows if r.pixels is not None and len(r.pixels)]
        if not parts:
            return {}
        most = max(t.shape[1] for t, _ in parts)
        for tiles, _ in parts:
            if tiles.shape[2:] != parts[0][0].shape[2:]:
                raise CollateError(f"LLaVA-NeXT tiles of {tuple(tiles.shape[-2:])} and "
                                   f"{tuple(parts[0][0].shape[-2:])} px cannot share a batch")
        pixels = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, most - t.shape[1])) for t, _ in parts])
        return {"pixel_values": pixels, "image_sizes": torch.cat([s for _, s in parts])}

    def merge(self, batches, pad_token_id):
        if len(batches) == 1:
            return dict(batches[0])
        rows = []
        for b in batches:
            extra = set(b) - {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
            if extra or b["input_ids"].shape[0] != 1:
                raise CollateError(f"cannot merge batch keys {sorted(extra)}" if extra
                                   else "merge takes single-prompt batches")
            rows.append(EncodedRow(b["input_ids"][0], pixels=b.get("pixel_values"), image_sizes=b.get("image_sizes")))
        batch = pad_tokens(rows, pad_token_id)
        batch.update(self.pixel_batch(rows))
        return batch


__all__ = ["LlavaNextFormat", "MISTRAL_TEMPLATE", "llava_next_tokens"]
