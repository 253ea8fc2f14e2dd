"""What every family's config mapping shares: the decoder and ViT fields of transformers' configs, both ways."""

from __future__ import annotations

from ...config import TextConfig, VisionConfig


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
