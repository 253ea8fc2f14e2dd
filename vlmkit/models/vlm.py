"""The composed model: images -> vision -> connector -> merged with text (spliced or cross-attended) -> logits."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import VLMConfig
from .anyres import AnyresPacker
from .attention_masks import image_groups, prefix_groups
from .connectors import build_connector
from .cross_attn import expand_image_mask, mllama_masks
from .kv_cache import KVCache
from .layers import init_normal_
from .rope import mrope_positions
from .text import ModelOutput, TextDecoder, positions_from_mask
from .vision import build_vision
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
        self.vision = TiledVisionTransformer(cfg.vision) if cfg.vision.max_num_tiles else build_vision(cfg.vision)
        self.connector = build_connector(cfg.connector)
        self.text = TextDecoder(cfg.text, cfg.cross_attn)
        self.anyres = None if cfg.anyres is None else AnyresPacker(cfg.anyres, cfg.vision, cfg.connector.out_dim)

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

    def image_features(self, pixel_values, pixel_attention_mask=None, image_grid_thw=None, image_sizes=None,
                       aspect_ratio_ids=None, aspect_ratio_mask=None) -> torch.Tensor:
        """Batch layout of the family's processor -> features [num_real_images, tokens, width], in prompt order
        (cross-attention: every slot, [B * M, ...]; the image-attention mask hides the padding images).
        Qwen2-VL: flat patches [P, C*T*p*p] of the images image_grid_thw [N, 3] describes -> [1, all tokens, width]
        (images of any size: their tokens in one row). LLaVA-NeXT: tiles + image_sizes [N, 2] -> [1, all images'
        tokens, width], as its images give different counts. Mllama: see encode_tiles."""
        if self.cfg.vision.max_num_tiles:
            return self.encode_tiles(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        if self.cfg.vision.flavour == "qwen2_vl":
            if image_grid_thw is None:
                raise ValueError("Qwen2-VL pixel_values need image_grid_thw (each image's patch grid)")
            patches = self.vision(pixel_values.to(self.dtype), image_grid_thw)
            return self.connector(patches)[None]
        if self.anyres is not None:
            return self.anyres_pack(self.encode_images(self.anyres_patches(pixel_values, image_sizes)), image_sizes)
        flat, mask = flat_images(pixel_values, pixel_attention_mask,
                                 keep_padding=self.cfg.merge == "cross_attention")
        return self.encode_images(flat, mask)

    def anyres_patches(self, pixel_values: torch.Tensor, image_sizes) -> torch.Tensor:
        """LLaVA-NeXT pixel_values [N, max_tiles, 3, S, S] (zero tiles pad the images with fewer) + image_sizes
        [N, 2] -> the real tiles of all images [sum tiles, 3, S, S]."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT images need image_sizes (each image's original height, width) with "
                             "pixel_values")
        counts = self.anyres.patch_counts(image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)
        if pixel_values.dim() == 4:
            if pixel_values.shape[0] != sum(counts):
                raise ImageTokenMismatch(f"pixel_values has {pixel_values.shape[0]} tiles, image_sizes need "
                                         f"{sum(counts)}")
            return pixel_values
        if pixel_values.dim() != 5 or pixel_values.shape[0] != len(counts) or pixel_values.shape[1] < max(counts):
            raise ImageTokenMismatch(f"pixel_values {tuple(pixel_values.shape)} does not fit image_sizes of "
                                     f"{len(counts)} images needing {counts} tiles")
        return torch.cat([tiles[:n] for tiles, n in zip(pixel_values, counts)])

    def anyres_pack(self, tile_features: torch.Tensor, image_sizes) -> torch.Tensor:
        """Connector outputs of all tiles [sum tiles, side*side, D] -> [1, all images' tokens, D]."""
        sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes
        per_image = tile_features.split(self.anyres.patch_counts(sizes))
        return torch.cat([self.anyres(f, int(h), int(w)) for f, (h, w) in zip(per_image, sizes)])[None]

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
        image_grid_thw: Optional[torch.Tensor] = None,
        image_sizes: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        image_features: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
        token_type_ids: Optional[torch.Tensor] = None,
        aspect_ratio_ids: Optional[torch.Tensor] = None,
        aspect_ratio_mask: Optional[torch.Tensor] = None,
        cross_attention_mask: Optional[torch.Tensor] = None,
        **unused,
    ) -> ModelOutput:
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values, pixel_attention_mask, image_grid_thw, image_sizes,
                                                 aspect_ratio_ids, aspect_ratio_mask)
        if cross_attention_mask is not None:  # Mllama [B, T, M, tiles]: each tile is one image of the mask
            image_attention_mask = cross_attention_mask.flatten(2)
        if position_ids is not None and image_grid_thw is not None and self.cfg.text.mrope_section is not None:
            raise ValueError("Qwen2-VL computes its own 3D positions for prompts with images: position_ids (e.g. "
                             "from packed training rows) cannot be given with images")
        if position_ids is None and self.cfg.text.mrope_section is not None:
            position_ids = self.mrope_position_ids(input_ids, attention_mask, image_grid_thw, cache)
        if self.cfg.merge == "splice":
            embeds = self.text.embed(input_ids)
            if image_features is not None:
                embeds = self.splice(input_ids, embeds, image_features)
            elif (input_ids == self.cfg.image_token_id).any() and (cache is None or cache.length == 0):
                raise ImageTokenMismatch("the prompt has image tokens but no images were given")
            return self.text(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                labels=labels, logits_to_keep=logits_to_keep,
                groups=self.groups(input_ids, attention_mask, token_type_ids, cache, image_features is not None),
                groups_in_window=self.cfg.bidirectional == "image",
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

    def mrope_position_ids(self, input_ids, attention_mask, image_grid_thw, cache) -> Optional[torch.Tensor]:
        """Qwen2-VL positions: 3D for a prompt with images (its per-row deltas kept in the cache for the tokens that
        follow), the ordinary count + the row's delta after it; None (ordinary positions) for text alone. The rest
        of a prompt after a reused prefix (image_grid_thw given, the cache recording the prefix's ids) gets its
        positions from the whole prompt."""
        past = cache.length if cache is not None else 0
        if past == 0 or image_grid_thw is not None:
            if image_grid_thw is None:
                return None
            ids = input_ids
            if past:
                known = getattr(cache, "token_ids", None)
                if known is None:
                    raise ValueError("the rest of a Qwen2-VL prompt after a cached prefix needs the prefix's token ids")
                ids = torch.cat([known[:, :past].to(input_ids.device), input_ids], dim=1)
            positions, deltas = mrope_positions(ids, attention_mask, image_grid_thw, self.cfg.image_token_id,
                                                self.cfg.vision.spatial_merge_size)
            if cache is not None:
                cache.rope_deltas = deltas
            return positions[:, :, past:]
        deltas = getattr(cache, "rope_deltas", None)
        if deltas is None:
            return None
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        return positions_from_mask(attention_mask, input_ids.shape[1]) + deltas[:, None].to(input_ids.device)
    def groups(self, input_ids, attention_mask, token_type_ids, cache, has_images: bool):
        """Bidirectional groups of the new tokens (attention_masks.py), None for causal-only families. PaliGemma's
        prefix is the prompt's first chunk (transformers: the first iteration) or any chunk carrying images."""
        kind = self.cfg.bidirectional
        if kind == "image":
            return image_groups(input_ids, self.cfg.image_token_id)
        if kind == "prefix" and (cache is None or cache.length == 0 or has_images):
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            return prefix_groups(token_type_ids, mask[:, -input_ids.shape[1]:])
        return None

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
