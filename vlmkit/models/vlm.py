"""The composed model: images -> vision -> connector -> merged with text (spliced or cross-attended) -> logits."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import VLMConfig
from .connectors import build_connector
from .cross_attn import expand_image_mask, mllama_masks
from .kv_cache import KVCache
from .layers import init_normal_
from .text import ModelOutput, TextDecoder
from .vision import VisionTransformer
from .vision_tiled import TiledVisionTransformer


class ImageTokenMismatch(ValueError):
    pass


def flat_images(pixel_values: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None, keep_padding: bool = False):
    """A batch's images as one list in prompt order -> (images [N, C, H, W], pixel masks [N, H, W] or None).

    LLaVA's pixel_values are already that list (no mask). The slot layout [B, M, C, H, W] (IDEFICS families) is
    flattened and, unless keep_padding, its padding slots dropped: the processors pad with all-zero images."""
    if pixel_values.dim() == 4:
        return pixel_values, None
    flat = pixel_values.reshape(-1, *pixel_values.shape[2:])
    mask = None if pixel_mask is None else pixel_mask.reshape(-1, *flat.shape[-2:])
    if keep_padding:
        return flat, mask
    real = flat.flatten(1).ne(0).any(dim=1)
    return flat[real], None if mask is None else mask[real]


class VLMModel(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = (TiledVisionTransformer if cfg.vision.max_num_tiles else VisionTransformer)(cfg.vision)
        self.connector = build_connector(cfg.connector)
        self.text = TextDecoder(cfg.text, cfg.cross_attn)

    @classmethod
    def random(cls, cfg: VLMConfig, seed: int = 0, std: float = 0.02) -> "VLMModel":
        """A randomly initialised model (tests, training from scratch)."""
        torch.manual_seed(seed)
        model = cls(cfg)
        init_normal_(model, std)
        return model

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text.embed_tokens.weight.device

    # ---- images -------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flat images [N, C, H, W] (+ pixel mask [N, H, W]) -> features [N, tokens, width]."""
        patch_mask = None
        if pixel_mask is not None:
            patch_mask = self.vision.patch_mask(pixel_mask.bool())
        elif self.cfg.vision.native_resolution:
            p = self.cfg.vision.patch_size
            patch_mask = torch.ones(
                pixel_values.shape[0], pixel_values.shape[-2] // p, pixel_values.shape[-1] // p,
                dtype=torch.bool, device=pixel_values.device,
            )
        features = self.vision(pixel_values.to(self.dtype), patch_mask)
        return self.connector(features, patch_mask)

    def encode_tiles(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """Mllama: pixel_values [B, M, tiles, C, S, S] -> features [B * M * tiles, tokens per tile, text width]
        (each tile is one 'image' of the cross-attention mask: cross_attention_mask [B, T, M, tiles])."""
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError("a tiled vision tower needs aspect_ratio_ids and aspect_ratio_mask with pixel_values")
        b, m, tiles = pixel_values.shape[:3]
        features = self.vision(pixel_values.flatten(0, 1).to(self.dtype), aspect_ratio_ids.reshape(b * m),
                               aspect_ratio_mask.reshape(b * m, tiles))
        features = self.connector(features)
        return features.reshape(b * m * tiles, features.shape[-2], features.shape[-1])

    def image_features(self, pixel_values, pixel_attention_mask=None, aspect_ratio_ids=None,
                       aspect_ratio_mask=None) -> torch.Tensor:
        """Batch layout of the family's processor -> features [num_real_images, tokens, width], in prompt order
        (cross-attention: every slot, [B * M, ...]; the image-attention mask hides the padding images)."""
        if self.cfg.vision.max_num_tiles:
            return self.encode_tiles(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        flat, mask = flat_images(pixel_values, pixel_attention_mask,
                                 keep_padding=self.cfg.merge == "cross_attention")
        return self.encode_images(flat, mask)

    # ---- merge ----------------------------------------------------------------------------------------------
    def splice(self, input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        slots = input_ids == self.cfg.image_token_id
        n_slots, n_feats = int(slots.sum()), features.shape[0] * features.shape[1]
        if n_slots != n_feats:
            raise ImageTokenMismatch(
                f"the prompt has {n_slots} image tokens but the images give {n_feats} features "
                f"({features.shape[0]} images x {features.shape[1]} tokens): the image placeholders and the "
                f"images do not match"
            )
        embeds = embeds.clone()
        embeds[slots] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        pixel_attention_mask: Optional[torch.Tensor] = None,
        image_attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        image_features: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
        aspect_ratio_ids: Optional[torch.Tensor] = None,
        aspect_ratio_mask: Optional[torch.Tensor] = None,
        cross_attention_mask: Optional[torch.Tensor] = None,
        **unused,
    ) -> ModelOutput:
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values, pixel_attention_mask, aspect_ratio_ids,
                                                 aspect_ratio_mask)
        if cross_attention_mask is not None:  # Mllama [B, T, M, tiles]: each tile is one image of the mask
            image_attention_mask = cross_attention_mask.flatten(2)
        if self.cfg.merge == "splice":
            embeds = self.text.embed(input_ids)
            if image_features is not None:
                embeds = self.splice(input_ids, embeds, image_features)
            elif (input_ids == self.cfg.image_token_id).any() and (cache is None or cache.length == 0):
                raise ImageTokenMismatch("the prompt has image tokens but no images were given")
            return self.text(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                labels=labels, logits_to_keep=logits_to_keep,
            )
        context, mask = self.cross_inputs(input_ids, image_features, image_attention_mask, cache)
        if mask is not None and self.cfg.cross_attn.kind == "mllama":
            real = None
            if aspect_ratio_ids is not None and context is not None:  # padding image slots have id 0
                slots = aspect_ratio_ids.reshape(input_ids.shape[0], -1) != 0
                real = slots.repeat_interleave(context.shape[1] // slots.shape[1], dim=1)
            mask = mllama_masks(mask, real)
        return self.text(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, labels=labels,
            cross_context=context, cross_mask=mask, logits_to_keep=logits_to_keep,
        )

    def cross_inputs(self, input_ids, image_features, image_attention_mask, cache):
        """Image context and image-attention mask for the gated cross-attention (IDEFICS)."""
        b, t = input_ids.shape
        if image_features is None:
            if cache is None or cache.cross_context is None:
                return None, None  # text only: cross-attention blocks are skipped
            context, last = cache.cross_context, cache.cross_mask_last
            if image_attention_mask is None:  # decode step: new tokens see what the last prompt token saw
                image_attention_mask = last.expand(b, t, -1)
        else:
            n_images = image_features.shape[0] // b
            context = image_features.reshape(b, n_images * image_features.shape[1], image_features.shape[2])
            if image_attention_mask is None:
                raise ValueError("cross-attention models need image_attention_mask alongside pixel_values")
            if image_attention_mask.shape[-1] != n_images:
                raise ImageTokenMismatch(
                    f"image_attention_mask covers {image_attention_mask.shape[-1]} images per prompt, "
                    f"pixel_values has {n_images}"
                )
        if cache is not None:
            cache.cross_context = context
            cache.cross_mask_last = image_attention_mask[:, -1:]
        tokens_per_image = context.shape[1] // image_attention_mask.shape[-1]
        return context, expand_image_mask(image_attention_mask, tokens_per_image)
