"""Qwen2-VL and Qwen2.5-VL processing rules (transformers' Qwen2VLProcessor / Qwen2_5_VLProcessor).

The prompt names each image `<|vision_start|><|image_pad|><|vision_end|>` (the chat template writes it); the
processor repeats `<|image_pad|>` once per merged patch: grid_t * grid_h * grid_w / merge_size^2 times. Images are
flat: pixel_values [all patches, 3 * T * p * p] of every image in prompt order, image_grid_thw [N, 3].
"""

from __future__ import annotations

import torch

from ..batching import CollateError, EncodedRow
from ..prompts import PromptRules, fill_placeholders, segments_text
from .base import Format

IMAGE_PAD = "<|image_pad|>"
# The Qwen2-VL-Instruct / Qwen2.5-VL-Instruct chat template: ChatML, a default system turn, vision tokens per image.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


class Qwen2VLFormat(Format):
    """`<|image_pad|>` x (merged patches) per image; flat patches + image_grid_thw; no BOS, no extra stop token."""

    name = "qwen2_vl"
    template = QWEN2_VL_TEMPLATE
    image_suffix = ""
    flat_pixels = True

    def read_rules(self, proc_cfg, special, do_image_splitting=False, cfg=None) -> PromptRules:
        return PromptRules(self.name, image_token=special.get("image_token") or IMAGE_PAD)

    def required_tokens(self, rules):
        return [rules.image_token]

    def stop_tokens(self, rules):
        return []

    def banned_tokens(self, rules):
        return []

    def expected_tokens(self, rules, cfg):
        return None  # every image has its own count

    def expand(self, segments, rules, images, index, special, expected=None):
        n = images["num_images"][index] if images else 0
        start = sum(images["num_images"][:index]) if n else 0
        merge = images.get("merge_size", 2) if n else 2
        counts = [int(g.prod()) // merge**2 for g in images["image_grid_thw"][start:start + n]] if n else []
        return fill_placeholders(segments_text(segments, rules.image_token), rules.image_token,
                                 [rules.image_token * c for c in counts])

    def process_images(self, image_processor, loaded):
        if not any(loaded):
            return {}
        out = image_processor(loaded)
        out["merge_size"] = image_processor.settings.merge_size
        return out

    def image_cost(self, rules, settings):
        size = getattr(settings, "size", None) or {}
        block = getattr(settings, "patch_size", 14) * getattr(settings, "merge_size", 2)
        return min(size.get("longest_edge", 448 * 448) // block**2, 1280) + 2

    def row(self, ids, images, index, image_token_id, eos_token_id):
        out = EncodedRow(ids)
        if "pixel_values" in images:
            counts = images["num_images"]
            start, n = sum(counts[:index]), counts[index]
            grids = images["image_grid_thw"]
            offsets = torch.cat([grids.new_zeros(1), grids.prod(-1).cumsum(0)])
            out.pixels = images["pixel_values"][int(offsets[start]):int(offsets[start + n])]
            out.image_grid = grids[start:start + n]
        return out

    def pixel_batch(self, rows):
        used = [r for r in rows if r.image_grid is not None and len(r.image_grid)]
        if not used:
            return {}
        return {"pixel_values": torch.cat([r.pixels for r in used]),
                "image_grid_thw": torch.cat([r.image_grid for r in used])}

    def merge(self, batches, pad_token_id):
        if len(batches) == 1:
            return dict(batches[0])
        allowed = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
        keys = set().union(*batches)
        if keys - allowed:
            raise CollateError(f"cannot merge batch keys {sorted(keys - allowed)}")
        if any(b["input_ids"].shape[0] != 1 for b in batches):
            raise CollateError("merge takes single-prompt batches")
        rows = [EncodedRow(b["input_ids"][0], pixels=b.get("pixel_values"), image_grid=b.get("image_grid_thw"))
                for b in batches]
        return self.collate(rows, pad_token_id)


class Qwen25VLFormat(Qwen2VLFormat):
    name = "qwen2_5_vl"
