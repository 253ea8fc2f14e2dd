"""Qwen2-VL and Qwen2.5-VL configs: transformers' config.json <-> VLMConfig."""

from __future__ import annotations

from ...config import ConnectorConfig, TextConfig, VisionConfig, VLMConfig
from .common import UnsupportedCheckpoint, text_from_hf, text_to_hf


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
