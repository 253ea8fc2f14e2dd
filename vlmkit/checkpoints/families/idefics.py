"""IDEFICS, Idefics2, Idefics3 / SmolVLM configs: transformers' config.json <-> VLMConfig."""

from __future__ import annotations

from ...config import ConnectorConfig, CrossAttnConfig, VLMConfig
from .common import text_from_hf, text_to_hf, vision_from_hf, vision_to_hf, SIGLIP


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
