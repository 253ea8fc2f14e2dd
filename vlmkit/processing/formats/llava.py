"""LLaVA-1.5 processing rules (transformers' LlavaProcessor)."""

from __future__ import annotations

import torch

from ..batching import EncodedRow
from ..prompts import IMAGE_TOKEN, LLAVA_TEMPLATE, PromptError, PromptRules, fill_placeholders, segments_text
from .base import Format


class LlavaFormat(Format):
    """LLaVA-1.5: one `<image>` per image feature; images are a flat list; no fake tokens, no extra stop token."""

    name = "llava"
    template = LLAVA_TEMPLATE
    image_suffix = "\n"
    flat_pixels = True

    def read_rules(self, proc_cfg, special, do_image_splitting=False, cfg=None) -> PromptRules:
        has = bool(proc_cfg)
        strategy_default = "default" if cfg is None or cfg.vision.drop_class_token else "full"
        extra_default = 1 if cfg is None or cfg.vision.class_token else 0
        return PromptRules(
            "llava",
            image_token=proc_cfg.get("image_token") or special.get("image_token") or IMAGE_TOKEN,
            patch_size=proc_cfg.get("patch_size") or (cfg.vision.patch_size if cfg is not None else 14),
            num_additional_image_tokens=proc_cfg.get("num_additional_image_tokens", 0 if has else extra_default),
            vision_feature_select_strategy=proc_cfg.get("vision_feature_select_strategy",
                                                        None if has else strategy_default),
        )

    def required_tokens(self, rules):
        return [rules.image_token]

    def stop_tokens(self, rules):
        return []

    def banned_tokens(self, rules):
        return []

    def expected_tokens(self, rules, cfg):
        return cfg.tokens_per_image or None

    def expand(self, segments, rules, images, index, special, expected=None):
        n = images["num_images"][index] if images else 0
        h, w = images["pixel_values"].shape[-2:] if n else (0, 0)
        tokens = rules.llava_tokens(h, w) if n else 0
        if n and expected and tokens != expected:
            raise PromptError(f"images of {h}x{w} give {tokens} image tokens but the model makes "
                              f"{expected} features per image")
        return fill_placeholders(segments_text(segments, rules.image_token), rules.image_token,
                                 [rules.image_token * tokens] * n)

    def pixel_batch(self, rows):
        images = [r.pixels for r in rows if r.pixels is not None and len(r.pixels)]
        return {"pixel_values": torch.cat(images)} if images else {}

    def image_cost(self, rules, settings):
        crop = getattr(settings, "crop_size", None) or {"height": 336, "width": 336}
        return rules.llava_tokens(crop["height"], crop["width"])

    def row(self, ids, images, index, image_token_id, eos_token_id):
        out = EncodedRow(ids)
        if "pixel_values" in images:
            counts = images["num_images"]
            start = sum(counts[:index])
            out.pixels = images["pixel_values"][start:start + counts[index]]
        return out
