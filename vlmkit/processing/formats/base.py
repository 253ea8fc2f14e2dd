"""`Format`: the processing rules every family shares; each family subclasses it in its own module."""

from __future__ import annotations

from typing import Optional

from ..batching import CollateError, EncodedRow, pad_slots, pad_tokens
from ..prompts import IDEFICS2_TEMPLATE, PromptRules, split_placeholders

_BATCH_KEYS = {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "image_attention_mask"}


class Format:
    """The rules every family shares; subclasses hold what differs. Stateless: one instance per family."""

    name = ""  # llava | idefics | idefics2 | idefics3 | smolvlm
    template = IDEFICS2_TEMPLATE  # chat template for checkpoints without one (documented in the README)
    image_suffix = ""  # what a rendered chat writes after each image placeholder
    flat_pixels = False  # pixel_values [N, 3, H, W] instead of [B, M, 3, H, W]
    cross_attention = False  # the batch carries image_attention_mask
    writes_bos = False  # the processor writes the BOS text itself (the tokenizer adds none)
    packable = True  # training rows may share a row (packing)

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
    def training_row(self, row: EncodedRow) -> EncodedRow:
        """A labelled training row's family-specific last touch (PaliGemma: the answer is the suffix)."""
        return row

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
