"""LLaVA-1.5 and LLaVA-NeXT configs: transformers' config.json <-> VLMConfig."""

from __future__ import annotations

from ...config import AnyresConfig, ConnectorConfig, VLMConfig
from .common import UnsupportedCheckpoint, text_from_hf, text_to_hf, vision_from_hf, vision_to_hf


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
    cfg = llava_from_hf(d)
    if text_type == "qwen2":  # Qwen2 attention has q/k/v biases and no o_proj bias: not a config field there
        cfg.text.qkv_bias = True
    # Qwen2 configs carry a sliding_window that only applies with use_sliding_window
    window = d["text_config"].get("sliding_window") if d["text_config"].get("use_sliding_window", True) else None
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
    if c.text.qkv_bias:  # a Qwen2 decoder: written as Qwen2Config, whose q/k/v biases are implied
        out["text_config"] = {k: v for k, v in text_to_hf(c.text, "qwen2").items()
                              if k not in ("attention_bias", "mlp_bias", "head_dim")}
    out.update({"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
                "image_grid_pinpoints": c.anyres.grid_pinpoints,
                "image_seq_length": (c.vision.image_size // c.vision.patch_size) ** 2})
    return out
