"""What `VLM.info()` says of a model: its config's facts, parameter counts per part, memory. Torch-free (modules
are only walked, never computed on), so `vlmkit info`'s fast path (checkpoints/header_info.py) builds the same dict
from checkpoint headers."""

from __future__ import annotations

from typing import Optional

from .anyres_grid import image_tokens

def parameter_count(module, keep=lambda name: True) -> int:
    """Parameters of `module` (a torch module, or None) whose names pass `keep`. A quantized layer's weight lives in
    buffers: it counts as the out x in elements it stands for."""
    if module is None:
        return 0
    n = sum(p.numel() for name, p in module.named_parameters() if keep(name))
    return n + sum(getattr(m, "out_features", getattr(m, "num_embeddings", 0))
                   * getattr(m, "in_features", getattr(m, "embedding_dim", 0))
                   for name, m in module.named_modules() if hasattr(m, "dequantize") and keep(name))


def model_info(cfg, parameters: int, parts: dict, *, dtype: str, device: str, memory_bytes: int, itemsize: int,
               folder, quantization: Optional[dict], native_resolution: Optional[tuple] = None) -> dict:
    """The info dict. parts: parameters per part ("vision", "connector", "cross", "text"); itemsize: bytes of a float element (the KV cache's);
    native_resolution: (image size, tokens) of a Qwen2-VL processor, whose ranges the config does not hold."""
    t = cfg.text
    image_size, tokens = native_resolution or (cfg.vision.image_size, image_tokens(cfg))
    return {
        "family": cfg.extra.get("hf_architecture", cfg.family),
        "architecture": cfg.extra.get("hf_config", {}).get("architectures", [None])[0],
        "parameters": parameters,
        "vision_parameters": parts["vision"], "connector_parameters": parts["connector"],
        "cross_attention_parameters": parts["cross"], "text_parameters": parts["text"],
        "connector": cfg.connector.kind, "merge": cfg.merge, **tokens,
        "image_size": image_size, "context_length": t.max_position_embeddings,
        "dtype": dtype, "device": device,
        "memory_bytes": memory_bytes,
        "kv_cache_bytes_per_token": 2 * t.num_layers * t.num_kv_heads * t.head_dim * itemsize,
        "folder": str(folder) if folder else None,
        "quantization": (quantization or {}).get("mode"),
    }
