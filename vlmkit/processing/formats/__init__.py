"""Each family's processing rules in one place: `format_for(cfg_or_family)` -> its `Format`.

Ground truth: transformers 5.x `LlavaProcessor`, `IdeficsProcessor`, `Idefics2Processor`, `Idefics3Processor`,
`SmolVLMProcessor` (Idefics3's prompt rules, its tokens named by the tokenizer), `Gemma3Processor`,
`PaliGemmaProcessor` and `MllamaProcessor`. A format owns what differs between the families once a prompt is segments
(prompts.py) and its images are loaded:
  * the prompt settings read from the processor files (`PromptRules`) and the default chat template;
  * placeholder expansion, the BOS rule, the stop and banned tokens;
  * the batch: rows padded on the LEFT (ids with the pad id, attention_mask 0) and the pixel layout
      LLaVA       pixel_values [N, 3, H, W], the images of all rows in order
      LLaVA-NeXT  pixel_values [N, max_tiles, 3, S, S] (zero tiles pad), image_sizes [N, 2]
      IDEFICS     pixel_values [B, M, 3, H, W], image_attention_mask [B, T, M]
      Idefics2/3  pixel_values [B, M, 3, H, W], pixel_attention_mask [B, M, H, W]
      Qwen2-VL    pixel_values [all patches, 3*T*p*p], image_grid_thw [N, 3] (qwen2_vl.py)
      Gemma 3, PaliGemma  pixel_values [N, 3, H, W], token_type_ids [B, T]
      Mllama      pixel_values [B, M, tiles, 3, S, S], aspect_ratio_ids/_mask, cross_attention_mask [B, T, M, tiles]
    where missing slots are all-zero images (the model skips them: models/vlm.flat_images) and smaller images are
    padded with zeros bottom/right.
The processor, the training collator and the server's batching all build batches here. A family is one module
here (its `Format` subclass) and one entry in FORMATS.
"""

from __future__ import annotations

from .base import Format
from .gemma import Gemma3Format, PaliGemmaFormat
from .idefics import IdeficsFormat, idefics_image_attention_mask
from .idefics2 import Idefics2Format, Idefics3Format, SmolVLMFormat
from .llava import LlavaFormat
from .llava_next import LlavaNextFormat
from .mllama import MllamaFormat
from .qwen2_vl import Qwen25VLFormat, Qwen2VLFormat

__all__ = ["FORMATS", "Format", "format_for", "idefics_image_attention_mask"]

FORMATS = {f.name: f for f in (LlavaFormat(), LlavaNextFormat(), IdeficsFormat(), Idefics2Format(), Idefics3Format(),
                               SmolVLMFormat(), Qwen2VLFormat(), Qwen25VLFormat(), Gemma3Format(), PaliGemmaFormat(),
                               MllamaFormat())}


def format_for(cfg_or_family) -> Format:
    """A family name (one of FORMATS) or a VLMConfig -> its Format."""
    if isinstance(cfg_or_family, str):
        family = cfg_or_family
    else:
        family = cfg_or_family.extra.get("hf_architecture", cfg_or_family.family)
    try:
        return FORMATS[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FORMATS)}") from None
