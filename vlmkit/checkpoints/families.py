"""The families as checkpoint formats: HF config.json <-> VLMConfig, tensor-name prefixes, aliases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from ..config import AnyresConfig, ConnectorConfig, CrossAttnConfig, TextConfig, VisionConfig, VLMConfig


class UnsupportedCheckpoint(ValueError):
    pass


# ---- shared pieces ----------------------------------------------------------------------------------------------
def rope_theta(d: dict) -> float:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UnsupportedCheckpoint(f"RoPE scaling {kind!r} is not supported yet (only the default RoPE)")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def text_from_hf(d: dict, tie_default: bool = False) -> TextConfig:
    return TextConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"),
        act=d.get("hidden_act", "silu"),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta(d),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=d.get("tie_word_embeddings", tie_default),
        attention_bias=d.get("attention_bias", False),
        mlp_bias=d.get("mlp_bias", False),
        additional_vocab_size=d.get("additional_vocab_size", 0),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def text_to_hf(t: TextConfig, model_type: str) -> dict:
    return {
        "model_type": model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "hidden_act": t.act, "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
        "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias, "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
    }


def vision_from_hf(d: dict, **flavour) -> VisionConfig:
    return VisionConfig(
        hidden_size=d.get("hidden_size", d.get("embed_dim")),
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        patch_size=d["patch_size"],
        image_size=d["image_size"],
        num_channels=d.get("num_channels", 3),
        act=d.get("hidden_act", "quick_gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        **flavour,
    )


def vision_to_hf(v: VisionConfig, model_type: str, width_key: str = "hidden_size") -> dict:
    return {
        "model_type": model_type, width_key: v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "patch_size": v.patch_size,
        "image_size": v.image_size, "num_channels": v.num_channels, "hidden_act": v.act,
        "layer_norm_eps": v.layer_norm_eps,
    }


SIGLIP = dict(class_token=False, patch_bias=True, pre_norm=False, post_norm_features=True, native_resolution=True)


# ---- families ----------------------------------------------------------------------------------------------------
def llava_from_hf(d: dict) -> VLMConfig:
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise UnsupportedCheckpoint(f"vision_feature_layer={layer!r}: several feature layers are not supported")
    strategy = d.get("vision_feature_select_strategy", "default")
    vision = vision_from_hf(d["vision_config"], feature_layer=layer, drop_class_token=strategy == "default")
    text = text_from_hf(d["text_config"], d.get("tie_word_embeddings", False))
    connector = ConnectorConfig(
        kind="mlp", in_dim=vision.hidden_size, out_dim=text.hidden_size,
        act=d.get("projector_hidden_act", "gelu"), bias=d.get("multimodal_projector_bias", True),
    )
    return VLMConfig(
        family="llava", vision=vision, connector=connector, text=text,
        image_token_id=d.get("image_token_index", d.get("image_token_id")),
        tokens_per_image=vision.grid**2 + (0 if strategy == "default" else 1),
    )


def llava_to_hf(c: VLMConfig) -> dict:
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": vision_to_hf(c.vision, "clip_vision_model"),
        "text_config": text_to_hf(c.text, "llama"),
        "image_token_index": c.image_token_id, "projector_hidden_act": c.connector.act,
        "multimodal_projector_bias": c.connector.bias, "vision_feature_layer": c.vision.feature_layer,
        "vision_feature_select_strategy": "default" if c.vision.drop_class_token else "full",
        "image_seq_length": c.tokens_per_image, "tie_word_embeddings": c.text.tie_word_embeddings,
    }


# ---- LLaVA-NeXT: LLaVA's tower and projector, anyres tiles packed with image_newline -------------------------
LLAVA_NEXT_TEXT = ("llama", "mistral", "qwen2")  # the decoders of the released checkpoints


# transformers' defaults for what the hub's llava-hf configs (written by transformers 4.x) leave out: their text
# configs name only what differs from LlamaConfig / MistralConfig; no vision config means LlavaNextConfig's CLIP.
TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    sliding_window=4096, bos_token_id=1, eos_token_id=2),
}
LLAVA_NEXT_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, patch_size=14,
                         image_size=336, num_hidden_layers=24, num_attention_heads=16)


def llava_next_from_hf(d: dict) -> VLMConfig:
    text_type = (d.get("text_config") or {}).get("model_type", "llama")
    d = {**d, "text_config": {**TEXT_DEFAULTS.get(text_type, {}), **(d.get("text_config") or {})},
         "vision_config": d.get("vision_config") or LLAVA_NEXT_VISION}
    if text_type not in LLAVA_NEXT_TEXT:
        raise UnsupportedCheckpoint(f"LLaVA-NeXT with a {text_type!r} decoder is not supported (only "
                                    f"{', '.join(LLAVA_NEXT_TEXT)})")
    if text_type == "qwen2":  # Qwen2 attention has q/k/v biases and no o_proj bias: not a config field there
        raise UnsupportedCheckpoint("LLaVA-NeXT with a Qwen2 decoder needs q/k/v-only attention biases, which the "
                                    "decoder does not have yet")
    cfg = llava_from_hf(d)
    window = d["text_config"].get("sliding_window")
    if window and window < d["text_config"].get("max_position_embeddings", 0):
        raise UnsupportedCheckpoint(f"sliding-window attention (sliding_window={window}) is not supported yet")
    pinpoints = d.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    tile = cfg.vision.image_size
    if any(int(h) % tile or int(w) % tile for h, w in pinpoints):
        raise UnsupportedCheckpoint(f"image_grid_pinpoints {pinpoints} are not multiples of the vision tower's "
                                    f"{tile} px")
    if not cfg.vision.drop_class_token:
        raise UnsupportedCheckpoint("LLaVA-NeXT with vision_feature_select_strategy='full' is not supported (the "
                                    "tiles' class tokens do not fit the feature grid; transformers fails too)")
    cfg.family = "llava_next"
    cfg.anyres = AnyresConfig(grid_pinpoints=[[int(h), int(w)] for h, w in pinpoints])
    cfg.tokens_per_image = 0  # varies with each image's size
    return cfg


def llava_next_to_hf(c: VLMConfig) -> dict:
    out = llava_to_hf(c)
    out.update({"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
                "image_grid_pinpoints": c.anyres.grid_pinpoints,
                "image_seq_length": (c.vision.image_size // c.vision.patch_size) ** 2})
    return out


def idefics_from_hf(d: dict) -> VLMConfig:
    vision = vision_from_hf(d["vision_config"])
    vision.act = d["vision_config"].get("hidden_act", "gelu")
    text = text_from_hf(d)
    p = d.get("perceiver_config", {})
    if d.get("use_resampler", p.get("use_resampler", False)):
        connector = ConnectorConfig(
            kind="perceiver", in_dim=vision.hidden_size, out_dim=vision.hidden_size,
            num_latents=p.get("resampler_n_latents", 64), depth=p.get("resampler_depth", 6),
            num_heads=p.get("resampler_n_heads", 16), head_dim=p.get("resampler_head_dim", 96),
            qk_norm=p.get("qk_layer_norms_perceiver", False), norm_eps=1e-5,
        )
        tokens = connector.num_latents
    else:
        connector = ConnectorConfig(kind="identity", in_dim=vision.hidden_size, out_dim=vision.hidden_size)
        tokens = vision.num_positions
    cross = CrossAttnConfig(
        every=d.get("cross_layer_interval", 1), context_dim=vision.hidden_size,
        gate_kind=d.get("alpha_type", "float"), qk_norm=d.get("qk_layer_norms", False),
    )
    return VLMConfig(family="idefics", vision=vision, connector=connector, text=text, cross_attn=cross,
                     tokens_per_image=tokens)


def idefics_to_hf(c: VLMConfig) -> dict:
    out = text_to_hf(c.text, "idefics")
    out.update({
        "architectures": ["IdeficsForVisionText2Text"], "additional_vocab_size": c.text.additional_vocab_size,
        "vision_config": vision_to_hf(c.vision, "idefics_vision", width_key="embed_dim"),
        "cross_layer_interval": c.cross_attn.every, "alpha_type": c.cross_attn.gate_kind,
        "qk_layer_norms": c.cross_attn.qk_norm, "use_resampler": c.connector.kind == "perceiver",
        "perceiver_config": {
            "use_resampler": c.connector.kind == "perceiver", "resampler_n_latents": c.connector.num_latents,
            "resampler_depth": c.connector.depth, "resampler_n_heads": c.connector.num_heads,
            "resampler_head_dim": c.connector.head_dim, "qk_layer_norms_perceiver": c.connector.qk_norm,
        },
    })
    del out["head_dim"], out["num_key_value_heads"]
    return out


def idefics2_from_hf(d: dict) -> VLMConfig:
    vision = vision_from_hf(d["vision_config"], **SIGLIP)
    text = text_from_hf(d["text_config"], d.get("tie_word_embeddings", False))
    p = d["perceiver_config"]
    connector = ConnectorConfig(
        kind="idefics2", in_dim=vision.hidden_size, out_dim=text.hidden_size, hidden_dim=text.intermediate_size,
        act=text.act, num_latents=p["resampler_n_latents"], depth=p["resampler_depth"],
        num_heads=p["resampler_n_heads"], head_dim=p["resampler_head_dim"], num_kv_heads=p["num_key_value_heads"],
        perceiver_act=p.get("hidden_act", "silu"), norm_eps=p.get("rms_norm_eps", 1e-6),
    )
    return VLMConfig(family="idefics2", vision=vision, connector=connector, text=text,
                     image_token_id=d.get("image_token_id"), tokens_per_image=connector.num_latents)


def idefics2_to_hf(c: VLMConfig) -> dict:
    k = c.connector
    return {
        "architectures": ["Idefics2ForConditionalGeneration"], "model_type": "idefics2",
        "vision_config": vision_to_hf(c.vision, "idefics2_vision"),
        "text_config": text_to_hf(c.text, "mistral"), "image_token_id": c.image_token_id,
        "tie_word_embeddings": c.text.tie_word_embeddings,
        "perceiver_config": {
            "model_type": "idefics2_perceiver", "hidden_size": k.out_dim, "hidden_act": k.perceiver_act,
            "resampler_n_latents": k.num_latents, "resampler_depth": k.depth, "resampler_n_heads": k.num_heads,
            "resampler_head_dim": k.head_dim, "num_key_value_heads": k.num_kv_heads, "rms_norm_eps": k.norm_eps,
        },
    }


def idefics3_from_hf(d: dict, family: str = "idefics3") -> VLMConfig:
    vision = vision_from_hf(d["vision_config"], patch_keep_partial=True, **SIGLIP)
    text = text_from_hf(d["text_config"], d.get("tie_word_embeddings", False))
    s = d.get("scale_factor", 2)
    connector = ConnectorConfig(kind="pixel_shuffle", in_dim=vision.hidden_size, out_dim=text.hidden_size,
                                scale_factor=s)
    return VLMConfig(family=family, vision=vision, connector=connector, text=text,
                     image_token_id=d.get("image_token_id"), tokens_per_image=vision.grid**2 // s**2)


def idefics3_to_hf(c: VLMConfig, arch: str = "Idefics3ForConditionalGeneration", model_type: str = "idefics3"):
    return {
        "architectures": [arch], "model_type": model_type,
        "vision_config": vision_to_hf(c.vision, f"{model_type}_vision"),
        "text_config": text_to_hf(c.text, "llama"), "image_token_id": c.image_token_id,
        "scale_factor": c.connector.scale_factor, "tie_word_embeddings": c.text.tie_word_embeddings,
    }


def qwen_text_from_hf(d: dict) -> TextConfig:
    """Qwen2-VL's decoder: a text_config (transformers 5) or the flat fields of the hub's older files; M-RoPE
    ("mrope", or "default" with mrope_section) is ordinary RoPE with sections."""
    t = d.get("text_config") or d
    params = dict(t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise UnsupportedCheckpoint(f"RoPE scaling {kind!r} is not supported yet (only M-RoPE)")
    if t.get("use_sliding_window"):
        raise UnsupportedCheckpoint("Qwen2-VL with use_sliding_window=true is not supported")
    text = text_from_hf({**t, "rope_parameters": {"rope_theta": params.get("rope_theta", t.get("rope_theta", 1e6))}},
                        d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    text.qkv_bias = True
    text.mrope_section = list(params.get("mrope_section") or [16, 24, 24])
    if sum(text.mrope_section) * 2 != text.head_dim:
        raise UnsupportedCheckpoint(f"mrope_section {text.mrope_section} does not cover head_dim {text.head_dim}")
    return text


def qwen2_vl_from_hf(d: dict) -> VLMConfig:
    v = d["vision_config"]
    text = qwen_text_from_hf(d)
    qwen25 = "out_hidden_size" in v or d.get("model_type") == "qwen2_5_vl"
    width = v["hidden_size"] if qwen25 else v.get("embed_dim", 1280)
    rope = v.get("rope_parameters") or {}
    vision = VisionConfig(
        hidden_size=width, intermediate_size=v["intermediate_size"] if qwen25 else width * v.get("mlp_ratio", 4),
        num_layers=v["depth"], num_heads=v["num_heads"], patch_size=v.get("patch_size", 14),
        image_size=v.get("patch_size", 14), num_channels=v.get("in_channels", 3),
        act=v.get("hidden_act", "silu" if qwen25 else "quick_gelu"), layer_norm_eps=1e-6, class_token=False,
        pre_norm=False, flavour="qwen2_vl", temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2), norm="rmsnorm" if qwen25 else "layernorm",
        mlp="swiglu" if qwen25 else "mlp", rope_theta=float(rope.get("rope_theta", 10000.0)),
        window_size=v.get("window_size", 112) if qwen25 else 0,
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))) if qwen25 else (),
    )
    out = v.get("out_hidden_size", text.hidden_size) if qwen25 else v.get("hidden_size", text.hidden_size)
    connector = ConnectorConfig(kind="patch_merger", in_dim=width, out_dim=out, act="gelu", norm_eps=1e-6,
                                scale_factor=vision.spatial_merge_size, norm=vision.norm)
    ids = {k: d.get(k) for k in ("vision_start_token_id", "vision_end_token_id", "video_token_id")}
    return VLMConfig(family="qwen2_vl", vision=vision, connector=connector, text=text,
                     image_token_id=d.get("image_token_id", 151655), tokens_per_image=0, extra=ids)


def qwen2_vl_to_hf(c: VLMConfig, arch: str = "Qwen2VLForConditionalGeneration", model_type: str = "qwen2_vl"):
    v, t, qwen25 = c.vision, c.text, model_type == "qwen2_5_vl"
    text = text_to_hf(t, f"{model_type}_text")
    text["rope_parameters"]["mrope_section"] = list(t.mrope_section)
    for key in ("head_dim", "attention_bias", "mlp_bias"):
        del text[key]
    vision = {
        "model_type": f"{model_type}_vision" if not qwen25 else "qwen2_5_vl", "depth": v.num_layers,
        "num_heads": v.num_heads, "in_channels": v.num_channels, "patch_size": v.patch_size, "hidden_act": v.act,
        "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    if qwen25:
        vision.update(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                      out_hidden_size=c.connector.out_dim, window_size=v.window_size,
                      fullatt_block_indexes=list(v.fullatt_block_indexes))
    else:
        vision.update(embed_dim=v.hidden_size, hidden_size=c.connector.out_dim,
                      mlp_ratio=v.intermediate_size // v.hidden_size)
    return {"architectures": [arch], "model_type": model_type, "text_config": text, "vision_config": vision,
            "image_token_id": c.image_token_id, "tie_word_embeddings": t.tie_word_embeddings,
            **{k: val for k, val in c.extra.items() if k.endswith("token_id")}}
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


@dataclass
class Family:
    name: str
    architectures: tuple
    from_hf: Callable[[dict], VLMConfig]
    to_hf: Callable[[VLMConfig], dict]
    prefixes: dict  # V vision, T text model, H lm head, C connector, X cross-attention layers
    aliases: list = field(default_factory=list)  # (other tools' prefix, canonical prefix)


# transformers 5 writes the hub's layout (model.layers..., visual...); in memory: model.language_model, model.visual
QWEN2_VL_PREFIXES = dict(V="visual.", T="model.", H="lm_head.", C="visual.merger.", X="")
QWEN2_VL_ALIASES = [("model.language_model.", "model."), ("model.visual.", "visual.")]
# transformers 5 saves Gemma 3 / PaliGemma as LLaVA (its in-memory names and the hub's older ones are aliases)
GEMMA_PREFIXES = dict(V="vision_tower.", T="language_model.model.", H="language_model.lm_head.",
                      C="multi_modal_projector.", X="")
GEMMA_ALIASES = [("model.vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
                 ("vision_tower.vision_model.", "vision_tower."), ("model.language_model.", "language_model.model."),
                 ("lm_head.", "language_model.lm_head."), ("model.multi_modal_projector.", "multi_modal_projector.")]
IDEFICS2_PREFIXES = dict(V="model.vision_model.", T="model.text_model.", H="lm_head.", C="model.connector.", X="")

FAMILIES = {
    f.name: f
    for f in [
        Family(
            "llava", ("LlavaForConditionalGeneration",), llava_from_hf, llava_to_hf,
            dict(V="vision_tower.", T="language_model.model.", H="language_model.lm_head.",
                 C="multi_modal_projector.", X=""),
            # transformers >= 4.52 in memory, and the hub's original llava-hf layout
            aliases=[("model.vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
                     ("vision_tower.vision_model.", "vision_tower."),
                     ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")],
        ),
        Family(
            "llava_next", ("LlavaNextForConditionalGeneration",), llava_next_from_hf, llava_next_to_hf,
            dict(V="vision_tower.", T="language_model.model.", H="language_model.lm_head.",
                 C="multi_modal_projector.", X="", N=""),
            aliases=[("model.vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
                     ("vision_tower.vision_model.", "vision_tower."),
                     ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")],
        ),
        Family(
            "idefics", ("IdeficsForVisionText2Text",), idefics_from_hf, idefics_to_hf,
            dict(V="model.vision_model.", T="model.", H="lm_head.", C="model.perceiver_resampler.",
                 X="model.gated_cross_attn_layers."),
        ),
        Family("idefics2", ("Idefics2ForConditionalGeneration",), idefics2_from_hf, idefics2_to_hf,
               IDEFICS2_PREFIXES),
        Family("idefics3", ("Idefics3ForConditionalGeneration",), idefics3_from_hf, idefics3_to_hf,
               IDEFICS2_PREFIXES),
        Family("smolvlm", ("SmolVLMForConditionalGeneration",),
               lambda d: idefics3_from_hf(d, family="idefics3"),
               lambda c: idefics3_to_hf(c, "SmolVLMForConditionalGeneration", "smolvlm"), IDEFICS2_PREFIXES),
        Family("qwen2_vl", ("Qwen2VLForConditionalGeneration",), qwen2_vl_from_hf, qwen2_vl_to_hf,
               QWEN2_VL_PREFIXES, QWEN2_VL_ALIASES),
        Family("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), qwen2_vl_from_hf,
               lambda c: qwen2_vl_to_hf(c, "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
               QWEN2_VL_PREFIXES, QWEN2_VL_ALIASES),
        Family("gemma3", ("Gemma3ForConditionalGeneration",), gemma3_from_hf, gemma3_to_hf, GEMMA_PREFIXES,
               aliases=GEMMA_ALIASES),
        Family("paligemma", ("PaliGemmaForConditionalGeneration",), paligemma_from_hf, paligemma_to_hf,
               dict(GEMMA_PREFIXES, LINEAR="linear"), aliases=GEMMA_ALIASES),
    ]
}


def family_for_architecture(hf_config: dict) -> Family:
    archs = hf_config.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise UnsupportedCheckpoint(f"unsupported architecture {archs or hf_config.get('model_type')!r}; known: {known}")
