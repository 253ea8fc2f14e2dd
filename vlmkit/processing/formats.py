"""Each family's processing rules in one place: `format_for(cfg_or_family)` -> its `Format`.

Ground truth: transformers 5.x `LlavaProcessor`, `IdeficsProcessor`, `Idefics2Processor`, `Idefics3Processor` and
`SmolVLMProcessor` (Idefics3's prompt rules, its tokens named by the tokenizer). A format owns what differs between
the families once a prompt is segments (prompts.py) and its images are loaded:
  * the prompt settings read from the processor files (`PromptRules`) and the default chat template;
  * placeholder expansion, the BOS rule, the stop and banned tokens;
  * the batch: rows padded on the LEFT (ids with the pad id, attention_mask 0) and the pixel layout
      LLaVA       pixel_values [N, 3, H, W], the images of all rows in order
      IDEFICS     pixel_values [B, M, 3, H, W], image_attention_mask [B, T, M]
      Idefics2/3  pixel_values [B, M, 3, H, W], pixel_attention_mask [B, M, H, W]
    where missing slots are all-zero images (the model skips them: models/vlm.flat_images) and smaller images are
    padded with zeros bottom/right.
The processor, the training collator and the server's batching all build batches here.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from PIL import ImageOps

from .batching import CollateError, EncodedRow, pad_image_masks, pad_slots, pad_tokens
from .prompts import (
    END_OF_UTTERANCE, FAKE_TOKEN, GLOBAL_TOKEN, IDEFICS2_TEMPLATE, IMAGE_TOKEN, LLAVA_TEMPLATE, PromptError,
    PromptRules, fill_placeholders, segments_text, split_placeholders,
)

__all__ = ["Format", "format_for", "idefics_image_attention_mask"]

_BATCH_KEYS = {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "image_attention_mask"}


class Format:
    """The rules every family shares; subclasses hold what differs. Stateless: one instance per family."""

    name = ""  # llava | idefics | idefics2 | idefics3 | smolvlm
    template = IDEFICS2_TEMPLATE  # chat template for checkpoints without one (documented in the README)
    image_suffix = ""  # what a rendered chat writes after each image placeholder
    flat_pixels = False  # pixel_values [N, 3, H, W] instead of [B, M, 3, H, W]
    cross_attention = False  # the batch carries image_attention_mask
    writes_bos = False  # the processor writes the BOS text itself (the tokenizer adds none)

    def __repr__(self) -> str:
        return f"format_for({self.name!r})"

    # ---------------------------------------------------------------------------------------------- settings
    def read_rules(self, proc_cfg: dict, special: dict, do_image_splitting: bool = False, cfg=None) -> PromptRules:
        """Prompt settings as transformers' processors read them: processor_config.json, then the tokenizer's
        named tokens (`special`: {"image_token": ...}); the model config (a VLMConfig) is the fallback for folders
        without processor files. do_image_splitting: the image processor's (Idefics2)."""
        raise NotImplementedError

    def required_tokens(self, rules: PromptRules) -> list[str]:
        return [rules.image_token, rules.fake_token]

    def stop_tokens(self, rules: PromptRules) -> list[str]:
        """Tokens that end an answer besides the tokenizer's EOS ids."""
        return [rules.end_of_utterance]

    def banned_tokens(self, rules: PromptRules) -> list[str]:
        """Tokens generation never produces (as the IDEFICS model cards pass bad_words_ids)."""
        return [rules.image_token, rules.fake_token]

    def expected_tokens(self, rules: PromptRules, cfg) -> Optional[int]:
        """Check the prompt rules against the model (image tokens must equal image features); -> the features
        per image the expansion must give, when it depends on the image size (LLaVA)."""
        if cfg.tokens_per_image and rules.image_seq_len != cfg.tokens_per_image:
            raise ValueError(f"processor image_seq_len={rules.image_seq_len} but the model makes "
                             f"{cfg.tokens_per_image} features per image")
        return None

    # ---------------------------------------------------------------------------------------------- text
    def chat_text(self, text: str, bos: Optional[str]) -> str:
        """A chat template's output as the family's processor takes it."""
        return text

    def split(self, text: str, image_token: str) -> list:
        return split_placeholders(text, image_token)

    def prepare_image(self, source, limits):
        """An image source before loading (Idefics2 treats PIL transparency its own way)."""
        return source

    def process_images(self, image_processor, loaded: list[list]) -> dict:
        """Images per prompt -> the image processor's output ({} when there is no image)."""
        return image_processor(loaded) if any(loaded) else {}

    def expand(self, segments: list, rules: PromptRules, images: dict, index: int, special: dict,
               expected: Optional[int] = None) -> str:
        """Prompt `index`'s text with each placeholder expanded to its image tokens; `images` is
        process_images' output for the whole batch, `special` the tokenizer's named special tokens."""
        raise NotImplementedError

    def add_special_tokens(self, text: str, from_chat: bool, bos: Optional[str]) -> bool:
        """Whether the tokenizer adds its special tokens (BOS): not when the chat template already wrote one, as
        apply_chat_template(tokenize=True)."""
        return not (from_chat and bos is not None and text.startswith(bos))

    def image_cost(self, rules: PromptRules, settings) -> int:
        """Tokens an image adds, estimated without reading it (for length grouping)."""
        return rules.image_seq_len + 2

    # ---------------------------------------------------------------------------------------------- rows
    def row(self, ids, images: dict, index: int, image_token_id: int, eos_token_id: Optional[int]) -> EncodedRow:
        """Prompt `index` of a processed batch as a row: its ids and its slice of the image tensors."""
        out = EncodedRow(ids)
        if "pixel_values" in images:
            count = self._slots(images, index)
            out.pixels = images["pixel_values"][index, :count]
            if "pixel_attention_mask" in images:
                out.pixel_mask = images["pixel_attention_mask"][index, :count]
        return out

    def _slots(self, images: dict, index: int) -> int:
        """How many image slots prompt `index` fills (crops and tiles are slots)."""
        return sum(images["crops_per_image"][index])

    def collate(self, rows: list, pad_token_id: int, positions: bool = False) -> dict:
        """Rows -> the batch the model takes, padded on the left (+ labels when the rows have them, + position_ids
        with `positions`)."""
        batch = pad_tokens(rows, pad_token_id, positions)
        batch.update(self.pixel_batch(rows))
        return batch

    def pixel_batch(self, rows: list) -> dict:
        """The rows' images in the family's layout (here [B, M, 3, H, W] + pixel masks)."""
        if not any(r.pixels is not None and len(r.pixels) for r in rows):
            return {}
        return pad_slots(rows)

    def merge(self, batches: list[dict], pad_token_id: int) -> dict:
        """Single-prompt processor outputs (without padding) -> one batch, as the processor would have padded them
        together. CollateError when they cannot share one (e.g. LLaVA images of two sizes)."""
        if len(batches) == 1:
            return dict(batches[0])
        keys = set().union(*batches)
        if keys - _BATCH_KEYS:
            raise CollateError(f"cannot merge batch keys {sorted(keys - _BATCH_KEYS)}")
        if any(b["input_ids"].shape[0] != 1 for b in batches):
            raise CollateError("merge takes single-prompt batches")
        rows = []
        for b in batches:
            pixels, mask, seen = b.get("pixel_values"), b.get("pixel_attention_mask"), b.get("image_attention_mask")
            rows.append(EncodedRow(b["input_ids"][0], pixels=pixels if self.flat_pixels or pixels is None
                                   else pixels[0], pixel_mask=None if mask is None else mask[0],
                                   image_mask=None if seen is None else seen[0]))
        try:
            return self.collate(rows, pad_token_id)
        except (RuntimeError, IndexError) as e:  # shapes that do not line up
            raise CollateError(f"cannot merge these prompts into one batch: {e}") from None


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


FORMATS = {f.name: f for f in (LlavaFormat(), IdeficsFormat(), Idefics2Format(), Idefics3Format(), SmolVLMFormat())}


def format_for(cfg_or_family) -> Format:
    """A family name (llava | idefics | idefics2 | idefics3 | smolvlm) or a VLMConfig -> its Format."""
    if isinstance(cfg_or_family, str):
        family = cfg_or_family
    else:
        family = cfg_or_family.extra.get("hf_architecture", cfg_or_family.family)
    try:
        return FORMATS[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FORMATS)}") from None
