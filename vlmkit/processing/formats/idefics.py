"""IDEFICS (1) processing rules (transformers' IdeficsProcessor)."""

from __future__ import annotations

from typing import Optional

import torch

from ..batching import pad_image_masks, pad_slots
from ..prompts import PromptRules, split_placeholders
from .base import Format


class IdeficsFormat(Format):
    """IDEFICS (1): `<fake><image><fake>` per image, BOS written by the processor, gated cross-attention that sees
    the images through image_attention_mask; the image processor always runs (text-only rows get one blank slot)."""

    name = "idefics"
    cross_attention = True
    writes_bos = True

    def read_rules(self, proc_cfg, special, do_image_splitting=False, cfg=None) -> PromptRules:
        return PromptRules("idefics", add_end_of_utterance_token=bool(proc_cfg.get("add_end_of_utterance_token")),
                           add_eos_token=bool(proc_cfg.get("add_eos_token")))

    def expected_tokens(self, rules, cfg):
        return None

    def chat_text(self, text, bos):
        return text[len(bos):] if bos and text.startswith(bos) else text  # IdeficsProcessor writes the BOS itself

    def split(self, text, image_token):
        # IDEFICS strips spaces around each text item; a blank piece between two placeholders would still count as
        # a text item and stop the two images sharing a fake token, so it is dropped.
        return [s for s in split_placeholders(text, image_token) if not isinstance(s, str) or s.strip(" ")]

    def process_images(self, image_processor, loaded):
        return image_processor(loaded)

    def expand(self, segments, rules, images, index, special, expected=None):
        """IdeficsProcessor: BOS text, then each string item (spaces stripped at both ends) and, per image,
        `<fake><image><fake>` (`<image><fake>` right after another image: the fake token is shared)."""
        fake, image, eou = rules.fake_token, rules.image_token, rules.end_of_utterance
        full = special.get("bos_token") or ""
        last_was_image = last_was_text = False
        for i, item in enumerate(segments):
            if i > 0:
                last_was_text = not last_was_image
            if isinstance(item, str):
                if rules.add_end_of_utterance_token and last_was_text:
                    full += eou
                full += item.strip(" ")
                last_was_image = False
            else:
                full += image + fake if last_was_image else fake + image + fake
                last_was_image = True
        if rules.add_eos_token and special.get("eos_token"):
            full += special["eos_token"]
        return full

    def add_special_tokens(self, text, from_chat, bos):
        return False

    def image_cost(self, rules, settings):
        return 3

    def _slots(self, images, index):
        return images["num_images"][index]

    def row(self, ids, images, index, image_token_id, eos_token_id):
        out = super().row(ids, images, index, image_token_id, eos_token_id)
        n = len(out.pixels) if out.pixels is not None else 0
        seen = idefics_image_attention_mask(torch.tensor([list(ids)]), image_token_id, eos_token_id, max(1, n))
        out.image_mask = seen[0, :, :n]
        return out

    def pixel_batch(self, rows):
        out = pad_slots(rows)  # every row has a pixel tensor: one all-zero slot at least
        # a batch that sees no image gets an all-zero bool mask, as IdeficsProcessor gives for text only
        sees = any(bool(r.image_mask.any()) for r in rows if r.image_mask is not None)
        out["image_attention_mask"] = pad_image_masks(rows, out["pixel_values"].shape[1],
                                                      torch.long if sees else torch.bool)
        return out


def idefics_image_attention_mask(input_ids, image_token_id: int, eos_token_id: Optional[int], num_images: int):
    """IdeficsProcessor's image_attention_mask [B, T, num_images] (int64) for padded input_ids [B, T].

    Each token sees only the latest image at or before it; tokens before any image see none (so do left-padding
    tokens); after an EOS token no image is seen until the next image token (the EOS itself still sees its image);
    image indices >= num_images are dropped."""
    ids = input_ids.tolist()
    out = torch.zeros(len(ids), len(ids[0]) if ids else 0, num_images, dtype=torch.long)
    for b, row in enumerate(ids):
        count, seen_eos = -1, False
        for t, tok in enumerate(row):
            if tok == image_token_id:
                count += 1
                seen_eos = False
            index = -1 if seen_eos else count
            if tok == eos_token_id:
                seen_eos = True
            if 0 <= index < num_images:
                out[b, t, index] = 1
    return out
