"""Llama 3.2 Vision (Mllama) configs: transformers' config.json <-> VLMConfig."""

from __future__ import annotations

from ...config import ConnectorConfig, CrossAttnConfig, VisionConfig, VLMConfig
from .common import UnsupportedCheckpoint, text_from_hf, text_to_hf


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
