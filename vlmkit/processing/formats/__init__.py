"""Each family's processing rules in one place: `format_for(cfg_or_family)` -> its `Format`.

Ground truth: transformers 5.x `LlavaProcessor`, `IdeficsProcessor`, `Idefics2Processor`, `Idefics3Processor`,
`SmolVLMProcessor` (Idefics3's prompt rules, its tokens named by the tokenizer) and `MllamaProcessor`. A format owns
what differs between the families once a prompt is segments (prompts.py) and its images are loaded:
  * the prompt settings read from the processor files (`PromptRules`) and the default chat template;
  * placeholder expansion, the BOS rule, the stop and banned tokens;
  * the batch: rows padded on the LEFT (ids with the pad id, attention_mask 0) and the pixel layout
      LLaVA       pixel_values [N, 3, H, W], the images of all rows in order
      IDEFICS     pixel_values [B, M, 3, H, W], image_attention_mask [B, T, M]
      Idefics2/3  pixel_values [B, M, 3, H, W], pixel_attention_mask [B, M, H, W]
      Mllama      pixel_values [B, M, tiles, 3, S, S], aspect_ratio_ids/_mask, cross_attention_mask [B, T, M, tiles]
    where missing slots are all-zero images (the model skips them: models/vlm.flat_images) and smaller images are
    padded with zeros bottom/right.
The processor, the training collator and the server's batching all build batches here. A family is one module
here (its `Format` subclass) and one entry in FORMATS.
"""

from __future__ import annotations

from .base import Format
from .idefics import IdeficsFormat, idefics_image_attention_mask
from .idefics2 import Idefics2Format, Idefics3Format, SmolVLMFormat
from .llava import LlavaFormat
from .mllama import MllamaFormat

__all__ = ["FORMATS", "Format", "format_for", "idefics_image_attention_mask"]

FORMATS = {f.name: f for f in (LlavaFormat(), IdeficsFormat(), Idefics2Format(), Idefics3Format(), SmolVLMFormat(),
                                     MllamaFormat())}


def format_for(cfg_or_family) -> Format:
    """A family name (llava | idefics | idefics2 | idefics3 | smolvlm | mllama) or a VLMConfig -> its Format."""
    if isinstance(cfg_or_family, str):
        family = cfg_or_family
    else:
        family = cfg_or_family.extra.get("hf_architecture", cfg_or_family.family)
    try:
        return FORMATS[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FORMATS)}") from None
