"""Gemma 3 and PaliGemma (1, 2) configs: transformers' config.json <-> VLMConfig."""

from __future__ import annotations

from typing import Optional

from ...config import ConnectorConfig, TextConfig, VisionConfig, VLMConfig
from .common import UnsupportedCheckpoint, text_from_hf, text_to_hf, vision_from_hf, vision_to_hf


# ---- Gemma 3 and PaliGemma (config.json omits fields at their defaults: the transformers defaults fill them) ----
SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16, image_size=224, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
GEMMA_DEFAULTS = {  # transformers' GemmaConfig, Gemma2Config, Gemma3TextConfig
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        query_pre_attn_scalar=256, sliding_window=4096),
}
FIXED_SIGLIP = dict(class_token=False, patch_bias=True, pre_norm=False, post_norm_features=True)


def siglip_from_hf(d: dict) -> VisionConfig:
    d = {**SIGLIP_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if d.get("vision_use_head") is True:
        raise UnsupportedCheckpoint("vision_config.vision_use_head=true: the SigLIP pooling head is not part of "
                                    "these VLMs (Gemma 3 and PaliGemma checkpoints set it false)")
    return vision_from_hf(d, **FIXED_SIGLIP)


def gemma_rope(d: dict, kind: str) -> tuple[float, float, Optional[float]]:
    """(global theta, global linear factor, local theta) from either RoPE layout."""
    params = d.get("rope_parameters") or {}
    if kind == "gemma3_text":
        full = dict(params.get("full_attention") or {})
        local = params.get("sliding_attention") or {}
        if d.get("rope_scaling"):
            full.update(d["rope_scaling"])
        theta = full.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        local_theta = local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    else:
        full, theta, local_theta = params or d.get("rope_scaling") or {}, None, None
        theta = full.get("rope_theta", d.get("rope_theta", 10_000.0))
    rope_type = full.get("rope_type", full.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise UnsupportedCheckpoint(f"RoPE scaling {rope_type!r} is not supported (default and linear are)")
    return float(theta), float(full.get("factor", 1.0)) if rope_type == "linear" else 1.0, local_theta


def gemma_text_from_hf(d: dict) -> TextConfig:
    kind = d.get("model_type", "gemma")
    if kind not in GEMMA_DEFAULTS:
        raise UnsupportedCheckpoint(f"text model {kind!r}: expected one of {sorted(GEMMA_DEFAULTS)}")
    if d.get("use_bidirectional_attention"):
        raise UnsupportedCheckpoint("use_bidirectional_attention=true (an embedding model) is not supported")
    d = {**GEMMA_DEFAULTS[kind], "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
         **{k: v for k, v in d.items() if v is not None}}
    theta, factor, local_theta = gemma_rope(d, kind)
    n = d["num_hidden_layers"]
    pattern = 2 if kind == "gemma2" else int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
    layer_types = d.get("layer_types") or (None if kind == "gemma" else [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)])
    text = text_from_hf({**d, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
                         "hidden_act": d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
                         "tie_word_embeddings": d.get("tie_word_embeddings", True)})
    text.gemma_norm = text.embed_scale = True
    if kind != "gemma":
        text.post_norms = True
        text.attn_scale = float(d["query_pre_attn_scalar"]) ** -0.5
        text.attn_softcap, text.final_softcap = d.get("attn_logit_softcapping"), d.get("final_logit_softcapping")
        text.sliding_window, text.layer_types = d.get("sliding_window"), list(layer_types)
    text.qk_norm = kind == "gemma3_text"
    text.rope_local_theta, text.rope_factor = local_theta, factor
    return text


def gemma3_from_hf(d: dict) -> VLMConfig:
    vision = siglip_from_hf(d.get("vision_config") or {})
    text = gemma_text_from_hf({"model_type": "gemma3_text", **(d.get("text_config") or {})})
    tokens = int(d.get("mm_tokens_per_image", 256))
    side = int(round(tokens**0.5))
    if side * side != tokens or vision.grid % side:
        raise UnsupportedCheckpoint(f"mm_tokens_per_image={tokens} does not pool the {vision.grid}x{vision.grid} "
                                    f"patch grid evenly")
    connector = ConnectorConfig(kind="pooled", in_dim=vision.hidden_size, out_dim=text.hidden_size,
                                scale_factor=vision.grid // side, norm_eps=vision.layer_norm_eps)
    return VLMConfig(family="gemma3", vision=vision, connector=connector, text=text,
                     image_token_id=d.get("image_token_index", d.get("image_token_id", 262144)),
                     tokens_per_image=tokens, bidirectional="image",
                     extra={"boi_token_id": d.get("boi_token_index", 255999),
                            "eoi_token_id": d.get("eoi_token_index", 256000)})


def gemma_text_to_hf(t: TextConfig) -> dict:
    kind = "gemma3_text" if t.qk_norm else "gemma2" if t.post_norms else "gemma"
    out = text_to_hf(t, kind)
    out["hidden_activation"] = out.pop("hidden_act")
    if kind == "gemma3_text":
        full = {"rope_type": "default", "rope_theta": t.rope_theta}
        if t.rope_factor != 1.0:
            full.update(rope_type="linear", factor=t.rope_factor)
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": t.rope_local_theta or t.rope_theta}}
    if kind != "gemma":
        out.update(query_pre_attn_scalar=round(t.attn_scale**-2), sliding_window=t.sliding_window,
                   layer_types=t.layer_types, attn_logit_softcapping=t.attn_softcap,
                   final_logit_softcapping=t.final_softcap)
    return out


def gemma3_to_hf(c: VLMConfig) -> dict:
    vision = vision_to_hf(c.vision, "siglip_vision_model")
    vision["vision_use_head"] = False
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "vision_config": vision,
            "text_config": gemma_text_to_hf(c.text), "mm_tokens_per_image": c.tokens_per_image,
            "image_token_index": c.image_token_id, "boi_token_index": c.extra.get("boi_token_id"),
            "eoi_token_index": c.extra.get("eoi_token_id"), "tie_word_embeddings": c.text.tie_word_embeddings}


def paligemma_from_hf(d: dict) -> VLMConfig:
    vision = siglip_from_hf({"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                             "num_attention_heads": 16, "patch_size": 14, **(d.get("vision_config") or {})})
    text_d = {"hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8,
              "num_key_value_heads": 1, "vocab_size": 257216, **(d.get("text_config") or {})}
    # PaliGemma sets it on its decoder, yet builds its own masks (prefix-LM), so it changes nothing there
    text_d.pop("use_bidirectional_attention", None)
    text = gemma_text_from_hf(text_d)
    text.position_offset = 1
    connector = ConnectorConfig(kind="linear", in_dim=vision.hidden_size,
                                out_dim=int(d.get("projection_dim", text.hidden_size)), bias=True)
    return VLMConfig(family="paligemma", vision=vision, connector=connector, text=text,
                     image_token_id=d.get("image_token_index", d.get("image_token_id", 256000)),
                     tokens_per_image=vision.grid**2, bidirectional="prefix")


def paligemma_to_hf(c: VLMConfig) -> dict:
    vision = vision_to_hf(c.vision, "siglip_vision_model")
    vision.update(vision_use_head=False, projection_dim=c.connector.out_dim)
    return {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
            "vision_config": vision, "text_config": gemma_text_to_hf(c.text), "image_token_index": c.image_token_id,
            "projection_dim": c.connector.out_dim, "hidden_size": c.text.hidden_size,
            "tie_word_embeddings": c.text.tie_word_embeddings}
