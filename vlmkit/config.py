"""Nested dataclass configs. A family is a combination of these, never a separate model class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class VisionConfig:
    """One ViT. CLIP flavour: class token, pre-layernorm, quick-GELU, bias-free patch conv.
    SigLIP flavour (Idefics2/3): no class token, GELU-tanh, post-layernorm, native resolution."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    patch_size: int = 14
    image_size: int = 224  # position table covers (image_size // patch_size) ** 2 patches
    num_channels: int = 3
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    class_token: bool = True
    patch_bias: bool = False
    pre_norm: bool = True  # CLIP's `pre_layrnorm` after the embeddings
    # Which hidden state feeds the connector: index into [embeddings, layer_1, ..., layer_N] (LLaVA: -2).
    feature_layer: int = -1
    post_norm_features: bool = False  # SigLIP applies post_layernorm to the selected features
    drop_class_token: bool = False  # LLaVA "default" strategy drops the class token from the features
    # Native resolution: images are padded and carry a pixel mask; positions are bucketed onto the fixed grid.
    native_resolution: bool = False
    # A patch is real when all its pixels are (Idefics2) or any of them is (Idefics3).
    patch_keep_partial: bool = False
    # Qwen2-VL flavour ("qwen2_vl"): flat patches [P, C*T*p*p] + image_grid_thw, 2D rotary, fused qkv, no
    # position table; Qwen2.5-VL adds RMSNorm, a biased SwiGLU MLP and window attention.
    flavour: Literal["clip", "qwen2_vl"] = "clip"
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["mlp", "swiglu"] = "mlp"
    rope_theta: float = 10000.0
    window_size: int = 0  # pixels per attention window side (Qwen2.5-VL); 0 = every block sees the whole image
    fullatt_block_indexes: tuple = ()  # the blocks that see the whole image when window_size is set
    attn_bias: bool = True  # Mllama's attention projections have no bias
    # Tiled images (Mllama): tiles per image, the tile-arrangement table (ids 1..num_aspect_ratios), the gated
    # global layers after the local ones, and the local layers whose outputs join the features (0-based).
    max_num_tiles: int = 0
    num_aspect_ratios: int = 0
    num_global_layers: int = 0
    intermediate_layers: tuple = ()

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + (1 if self.class_token else 0)


@dataclass
class TextConfig:
    """One Llama/Mistral decoder (IDEFICS adds decoupled extra vocabulary and optional qk-norm)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: Optional[int] = None
    act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3.1+ "llama3" RoPE: factor, low/high_freq_factor, original context
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections only
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head norm of queries and keys (IDEFICS `qk_layer_norms`, Gemma 3 `q_norm` / `k_norm`)
    # Gemma: RMSNorm scales by (1 + weight) in float32, token embeddings by sqrt(hidden_size), and (Gemma 2/3) norms
    # after attention and after the MLP as well as before them.
    gemma_norm: bool = False
    embed_scale: bool = False
    post_norms: bool = False
    attn_scale: Optional[float] = None  # softmax scale (Gemma 2/3: query_pre_attn_scalar ** -0.5); None: head_dim
    attn_softcap: Optional[float] = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: Optional[float] = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    # Local layers attend to the last `sliding_window` tokens; layer_types names each layer ("sliding_attention" or
    # "full_attention"); local layers take their own RoPE theta (Gemma 3) when rope_local_theta is set.
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None
    rope_local_theta: Optional[float] = None
    rope_factor: float = 1.0  # linear RoPE scaling of the global layers (Gemma 3 4B+: positions / 8)
    position_offset: int = 0  # PaliGemma counts positions from 1
    input_only_tokens: int = 0  # embedding rows past vocab_size that are never logits (Mllama: 8, <|image|>)
    additional_vocab_size: int = 0  # IDEFICS decoupled embeddings/head for added tokens
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None  # int or list of ints
    pad_token_id: Optional[int] = None
    # Multimodal RoPE (Qwen2-VL): head_dim/2 frequencies split into (temporal, height, width) sections, each
    # rotated by its own position row; positions [3, B, T]. None = ordinary RoPE.
    mrope_section: Optional[list] = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types names {len(self.layer_types)} layers, the decoder has {self.num_layers}")

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window) and self.layer_types is not None and \
            self.layer_types[layer] == "sliding_attention"


@dataclass
class ConnectorConfig:
    """Maps vision features to what the text side consumes.

    kind:
      "linear"            one Linear (LLaVA `linear`)
      "mlp"               Linear-act-Linear (LLaVA `mlp2x_gelu`)
      "perceiver"         IDEFICS resampler: LayerNorm, ReLU MLP, optional qk-norm; output stays vision width
      "idefics2"          SwiGLU projection to text width, then an RMSNorm/GQA perceiver
      "pixel_shuffle"     pixel shuffle by `scale_factor`, then a bias-free Linear (Idefics3/SmolVLM)
      "patch_merger"      Qwen2-VL: norm, each scale_factor^2 neighbouring patches concatenated, Linear-GELU-Linear
      "pooled"            `scale_factor` x `scale_factor` average pooling of the patch grid, Gemma RMSNorm, a
                          bias-free projection (Gemma 3)
    """

    kind: Literal["linear", "mlp", "identity", "perceiver", "idefics2", "pixel_shuffle", "patch_merger",
                  "pooled"] = "mlp"
    in_dim: int = 1024
    out_dim: int = 4096
    act: str = "gelu"
    bias: bool = True
    # projection MLP width (idefics2 SwiGLU projection uses the text intermediate size)
    hidden_dim: Optional[int] = None
    # perceiver
    num_latents: int = 64
    depth: int = 6
    num_heads: int = 16
    head_dim: int = 96
    num_kv_heads: Optional[int] = None
    qk_norm: bool = False
    mlp_ratio: int = 4
    perceiver_act: str = "silu"
    norm_eps: float = 1e-5
    # pixel shuffle; patch merger (spatial merge size)
    scale_factor: int = 2
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # patch merger


@dataclass
class CrossAttnConfig:
    """Gated cross-attention. IDEFICS/Flamingo: a block inserted before every `every`-th decoder layer (0, N, 2N,
    ...). Mllama: the decoder layers at the indexes `layers` of the checkpoint's stack are cross-attention layers
    (q/k norms, grouped heads, tokens that see no image still attend); `TextConfig.num_layers` counts the others."""

    kind: Literal["idefics", "mllama"] = "idefics"
    layers: tuple = ()  # Mllama: the stack indexes of the cross-attention layers
    every: int = 4
    context_dim: int = 1024  # width of the image features the text attends to
    gate_kind: Literal["float", "vector"] = "float"
    qk_norm: bool = False


@dataclass
class AnyresConfig:
    """LLaVA-NeXT "anyres": each image is cut into vision-sized patches on the best-fitting grid of
    `grid_pinpoints` ([height, width] pixel sizes) plus the whole image resized; the patch features are
    re-assembled, the padding removed by the original size and `image_newline` appended after each row."""

    grid_pinpoints: list = field(default_factory=list)
    newline: bool = True  # the checkpoint carries `image_newline`


@dataclass
class VLMConfig:
    family: Literal["llava", "llava_next", "idefics", "idefics2", "idefics3", "qwen2_vl", "gemma3", "paligemma",
                    "mllama"] = "llava"
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    cross_attn: Optional[CrossAttnConfig] = None  # set => images meet text by cross-attention, else spliced
    image_token_id: Optional[int] = None
    # Image features per image after the connector (the count the processor must emit per image).
    tokens_per_image: int = 0
    anyres: Optional[AnyresConfig] = None  # set => LLaVA-NeXT tiling: tokens per image vary with its size
    # Attention beyond causal in a prompt's prefill: "image" (Gemma 3: each image's tokens see each other) or
    # "prefix" (PaliGemma: image + prompt tokens see each other, token_type_ids 0).
    bidirectional: Optional[str] = None
    extra: dict = field(default_factory=dict)  # family-specific metadata kept for round trips (not used by modules)

    @property
    def merge(self) -> str:
        return "cross_attention" if self.cross_attn is not None else "splice"
