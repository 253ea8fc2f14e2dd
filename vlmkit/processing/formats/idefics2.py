"""Idefics2, Idefics3 and SmolVLM processing rules (transformers' Idefics2Processor, Idefics3Processor,
SmolVLMProcessor)."""

from __future__ import annotations

import re

from PIL import ImageOps

from ..prompts import (
    END_OF_UTTERANCE, FAKE_TOKEN, GLOBAL_TOKEN, IDEFICS2_TEMPLATE, IMAGE_TOKEN, PromptRules, fill_placeholders,
    segments_text,
)
from .base import Format


class Idefics2Format(Format):
    """Idefics2: `<fake>` + image_seq_len `<image>` + `<fake>` per image (x5 with splitting), adjacent fakes merged."""

    name = "idefics2"

    def read_rules(self, proc_cfg, special, do_image_splitting=False, cfg=None) -> PromptRules:
        fallback = cfg.tokens_per_image if cfg is not None and cfg.tokens_per_image else None
        return PromptRules(
            "idefics2",
            image_token=special.get("image_token") or IMAGE_TOKEN,
            fake_token=special.get("image_boundary_token") or FAKE_TOKEN,
            end_of_utterance=END_OF_UTTERANCE,
            image_seq_len=int(proc_cfg.get("image_seq_len") or fallback or 64),
            do_image_splitting=do_image_splitting,
        )

    def prepare_image(self, source, limits):
        """Idefics2Processor passes every image through transformers' load_image, which applies the EXIF
        orientation and `convert("RGB")`: transparency is DROPPED (the colour under transparent pixels shows), not
        composited on white as every other family does. Done here for PIL inputs so pixel values equal
        transformers'; encoded inputs (bytes, paths, URLs) are composited on white by load_image."""
        if not (hasattr(source, "getbands") and hasattr(source, "convert")):
            return source
        bands = source.getbands()
        if not ("A" in bands or "a" in bands or source.info.get("transparency") is not None):
            return source
        if source.width * source.height > limits.max_pixels:
            return source  # load_image refuses it before any conversion
        return ImageOps.exif_transpose(source).convert("RGB")

    def expand(self, segments, rules, images, index, special, expected=None):
        """Idefics2Processor: the image string replaces each placeholder, adjacent fake tokens merge, and a space
        follows a closing fake token directly followed by a word."""
        fake, image = rules.fake_token, rules.image_token
        image_str = f"{fake}{image * rules.image_seq_len}{fake}"
        if rules.do_image_splitting:
            image_str = image_str * 5
        text = segments_text(segments, image).replace(image, image_str).replace(f"{fake}{fake}", fake)
        return re.sub(rf"{re.escape(fake)}(?=[^\s<])", f"{fake} ", text)


class Idefics3Format(Format):
    """Idefics3: each image cut into tiles, `<fake><row_i_col_j>` + image_seq_len `<image>` per tile, then the
    whole image as `<fake><global-img>` + its tokens + `<fake>` (transformers' get_image_prompt_string)."""

    name = "idefics3"
    template = "{{ bos_token or '' }}" + IDEFICS2_TEMPLATE  # as Idefics3-8B-Llama3's and SmolVLM's
    named_tokens = False  # SmolVLMProcessor reads its tokens from the tokenizer's named tokens

    def read_rules(self, proc_cfg, special, do_image_splitting=False, cfg=None) -> PromptRules:
        fallback = cfg.tokens_per_image if cfg is not None and cfg.tokens_per_image else None
        named = special if self.named_tokens else {}
        return PromptRules(
            "idefics3",
            image_token=named.get("image_token") or IMAGE_TOKEN,
            fake_token=named.get("fake_image_token") or FAKE_TOKEN,
            global_token=named.get("global_image_token") or GLOBAL_TOKEN,
            end_of_utterance=named.get("end_of_utterance_token") or END_OF_UTTERANCE,
            image_seq_len=int(proc_cfg.get("image_seq_len") or fallback or 169),
        )

    def expand(self, segments, rules, images, index, special, expected=None):
        n = images["num_images"][index] if images else 0
        grids = list(zip(images["image_rows"][index], images["image_cols"][index])) if n else []
        return fill_placeholders(segments_text(segments, rules.image_token), rules.image_token,
                                 [self.image_string(r, c, rules) for r, c in grids])

    @staticmethod
    def image_string(rows: int, cols: int, rules: PromptRules) -> str:
        fake, image, glob, n = rules.fake_token, rules.image_token, rules.global_token, rules.image_seq_len
        if rows == 0 and cols == 0:
            return f"{fake}{glob}{image * n}{fake}"
        out = ""
        for r in range(rows):
            for c in range(cols):
                out += f"{fake}<row_{r + 1}_col_{c + 1}>{image * n}"
            out += "\n"
        return out + f"\n{fake}{glob}{image * n}{fake}"


class SmolVLMFormat(Idefics3Format):
    name = "smolvlm"
    named_tokens = True
