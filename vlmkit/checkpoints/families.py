"""The families as checkpoint formats: HF config.json <-> VLMConfig, tensor-name prefixes, aliases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..config import ConnectorConfig, CrossAttnConfig, TextConfig, VisionConfig, VLMConfig


class UnsupportedCheckpoint(ValueError):
    pass


# ---- shared pieces ----------------------------------------------------------------------------------------------
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_theta(d: dict) -> float:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise UnsupportedCheckpoint(f"RoPE scaling {kind!r} is not supported yet (only the default and llama3)")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def rope_scaling(d: dict):
    """Llama 3.1+ ("llama3") RoPE parameters, or None for the default RoPE."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type")) != "llama3":
        return None
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in params]
    if missing:
        raise UnsupportedCheckpoint(f"llama3 RoPE parameters lack {missing}")
    return {"rope_type": "llama3", **{k: params[k] for k in LLAMA3_ROPE_KEYS}}


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
        rope_scaling=rope_scaling(d),
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
        "rope_parameters": {"rope_type": "default", **(t.rope_scaling or {}), "rope_theta": t.rope_theta},
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


def mllama_from_hf(d: dict) -> VLMConfig:
    v, t = d["vision_config"], d["text_config"]
    if v.get("norm_eps", 1e-5) != 1e-5:  # transformers' pre/post layernorms keep LayerNorm's default eps
        raise UnsupportedCheckpoint(f"vision norm_eps={v['norm_eps']}: only 1e-5 is supported")
    layers = tuple(v.get("intermediate_layers_indices") or (3, 7, 15, 23, 30))
    tiles = v.get("max_num_tiles", 4)
    ratios = v.get("supported_aspect_ratios") or [
        (a, b) for a in range(1, tiles + 1) for b in range(1, tiles + 1) if a * b <= tiles]  # transformers' default
    vision = VisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v.get("attention_heads", v.get("num_attention_heads")), patch_size=v["patch_size"],
        image_size=v["image_size"], num_channels=v.get("num_channels", 3), act=v.get("hidden_act", "gelu"),
        attn_bias=False, max_num_tiles=tiles, num_aspect_ratios=len(ratios),
        num_global_layers=v.get("num_global_layers", 8), intermediate_layers=layers,
    )
    out_dim = vision.hidden_size * (1 + len(layers))
    if v.get("vision_output_dim", out_dim) != out_dim:
        raise UnsupportedCheckpoint(f"vision_output_dim={v['vision_output_dim']} but hidden_size x (1 + "
                                    f"{len(layers)} intermediate layers) = {out_dim}")
    cross_layers = tuple(t.get("cross_attention_layers") or ())
    if not cross_layers or any(not 0 <= j < t["num_hidden_layers"] for j in cross_layers):
        raise UnsupportedCheckpoint(f"cross_attention_layers={list(cross_layers)} do not fit "
                                    f"num_hidden_layers={t['num_hidden_layers']}")
    text = text_from_hf(t, d.get("tie_word_embeddings", False))
    text.num_layers -= len(set(cross_layers))
    text.input_only_tokens = 8  # MllamaTextModel's embedding table has vocab_size + 8 rows
    return VLMConfig(
        family="mllama", vision=vision, text=text,
        connector=ConnectorConfig(kind="linear", in_dim=out_dim, out_dim=text.hidden_size, bias=True),
        cross_attn=CrossAttnConfig(kind="mllama", layers=cross_layers, context_dim=text.hidden_size),
        image_token_id=d.get("image_token_index", d.get("image_token_id")),
        tokens_per_image=vision.max_num_tiles * vision.num_positions,
    )


def mllama_to_hf(c: VLMConfig) -> dict:
    v, layers = c.vision, sorted(c.cross_attn.layers)
    text = text_to_hf(c.text, "mllama_text_model")
    del text["head_dim"]
    text.update(num_hidden_layers=c.text.num_layers + len(layers), cross_attention_layers=layers)
    tiles = v.max_num_tiles
    return {
        "architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
        "image_token_index": c.image_token_id, "text_config": text,
        "vision_config": {
            "model_type": "mllama_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_global_layers": v.num_global_layers, "attention_heads": v.num_heads,
            "patch_size": v.patch_size, "image_size": v.image_size, "num_channels": v.num_channels,
            "hidden_act": v.act, "norm_eps": v.layer_norm_eps, "max_num_tiles": tiles,
            "intermediate_layers_indices": list(v.intermediate_layers), "vision_output_dim": c.connector.in_dim,
            "supported_aspect_ratios": [[w, h] for w in range(1, tiles + 1) for h in range(1, tiles + 1)
                                        if w * h <= tiles],
        },
    }


@dataclass
class Family:
    name: str
    architectures: tuple
    from_hf: Callable[[dict], VLMConfig]
    to_hf: Callable[[VLMConfig], dict]
    prefixes: dict  # V vision, T text model, H lm head, C connector, X cross-attention layers
    aliases: list = field(default_factory=list)  # (other tools' prefix, canonical prefix)


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
            "idefics", ("IdeficsForVisionText2Text",), idefics_from_hf, idefics_to_hf,
            dict(V="model.vision_model.", T="model.", H="lm_head.", C="model.perceiver_resampler.",
                 X="model.gated_cross_attn_layers."),
        ),
        Family("idefics2", ("Idefics2ForConditionalGeneration",), idefics2_from_hf, idefics2_to_hf,
               IDEFICS2_PREFIXES),
        Family("idefics3", ("Idefics3ForConditionalGeneration",), idefics3_from_hf, idefics3_to_hf,
               IDEFICS2_PREFIXES),
        Family(
            "mllama", ("MllamaForConditionalGeneration",), mllama_from_hf, mllama_to_hf,
            dict(V="vision_model.", T="language_model.model.", H="language_model.lm_head.",
                 C="multi_modal_projector.", X="language_model.model.layers."),
            # transformers 5 in memory
            aliases=[("model.vision_model.", "vision_model."), ("model.language_model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")],
        ),
        Family("smolvlm", ("SmolVLMForConditionalGeneration",),
               lambda d: idefics3_from_hf(d, family="idefics3"),
               lambda c: idefics3_to_hf(c, "SmolVLMForConditionalGeneration", "smolvlm"), IDEFICS2_PREFIXES),
    ]
}


def family_for_architecture(hf_config: dict) -> Family:
    archs = hf_config.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise UnsupportedCheckpoint(f"unsupported architecture {archs or hf_config.get('model_type')!r}; known: {known}")
