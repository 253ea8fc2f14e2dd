"""Explicit tensor-name maps between vlmkit modules and the Hugging Face layouts of each family.

A map is an ordered list of (our-name regex, HF-name template); `{V}`, `{T}`, `{C}`, `{X}` stand for the
family's prefixes of the vision tower, the text model, the connector and the gated cross-attention layers.
Every tensor name must match exactly one rule: nothing is mapped by guessing."""

from __future__ import annotations

import re

VISION_RULES = [
    (r"vision\.patch_embed\.(weight|bias)", "{V}embeddings.patch_embedding.\\1"),
    (r"vision\.class_embed", "{V}embeddings.class_embedding"),
    (r"vision\.pos_embed\.weight", "{V}embeddings.position_embedding.weight"),
    (r"vision\.pre_norm\.(weight|bias)", "{V}pre_layrnorm.\\1"),
    (r"vision\.post_norm\.(weight|bias)", "{V}post_layernorm.\\1"),
    (r"vision\.layers\.(\d+)\.norm1\.(weight|bias)", "{V}encoder.layers.\\1.layer_norm1.\\2"),
    (r"vision\.layers\.(\d+)\.norm2\.(weight|bias)", "{V}encoder.layers.\\1.layer_norm2.\\2"),
    (r"vision\.layers\.(\d+)\.attn\.o_proj\.(weight|bias)", "{V}encoder.layers.\\1.self_attn.out_proj.\\2"),
    (r"vision\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)", "{V}encoder.layers.\\1.self_attn.\\2_proj.\\3"),
    (r"vision\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", "{V}encoder.layers.\\1.mlp.\\2.\\3"),
]

QWEN_VISION_RULES = [  # Qwen2-VL / Qwen2.5-VL ViT ("visual.")
    (r"vision\.patch_embed\.weight", "{V}patch_embed.proj.weight"),
    (r"vision\.layers\.(\d+)\.(norm[12])\.(weight|bias)", "{V}blocks.\\1.\\2.\\3"),
    (r"vision\.layers\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", "{V}blocks.\\1.attn.\\2.\\3"),
    (r"vision\.layers\.(\d+)\.mlp\.(fc1|fc2|gate_proj|up_proj|down_proj)\.(weight|bias)",
     "{V}blocks.\\1.mlp.\\2.\\3"),
]

TEXT_RULES = [
    (r"text\.embed_tokens\.weight", "{T}embed_tokens.weight"),
    (r"text\.embed_tokens_extra\.weight", "{T}embed_tokens.additional_embedding.weight"),
    (r"text\.norm\.weight", "{T}norm.weight"),
    (r"text\.lm_head\.weight", "{H}weight"),
    (r"text\.lm_head_extra\.weight", "{H}additional_fc.weight"),
    (r"text\.layers\.(\d+)\.attn_norm\.weight", "{T}layers.\\1.input_layernorm.weight"),
    (r"text\.layers\.(\d+)\.mlp_norm\.weight", "{T}layers.\\1.{MLP_NORM}.weight"),
    (r"text\.layers\.(\d+)\.post_attn_norm\.weight", "{T}layers.\\1.post_attention_layernorm.weight"),
    (r"text\.layers\.(\d+)\.post_mlp_norm\.weight", "{T}layers.\\1.post_feedforward_layernorm.weight"),
    (r"text\.layers\.(\d+)\.attn\.([qk])_norm\.weight", "{T}layers.\\1.self_attn.\\2_norm.weight"),
    (r"text\.layers\.(\d+)\.attn\.([qkvo])_proj\.(weight|bias)", "{T}layers.\\1.self_attn.\\2_proj.\\3"),
    (r"text\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", "{T}layers.\\1.mlp.\\2_proj.\\3"),
]

CROSS_ATTN_RULES = [
    (r"text\.cross_blocks\.(\d+)\.attn_norm\.weight", "{X}\\1.input_layernorm.weight"),
    (r"text\.cross_blocks\.(\d+)\.mlp_norm\.weight", "{X}\\1.post_attention_layernorm.weight"),
    (r"text\.cross_blocks\.(\d+)\.([qkvo])_proj\.weight", "{X}\\1.cross_attn.\\2_proj.weight"),
    (r"text\.cross_blocks\.(\d+)\.([qk])_norm\.weight", "{X}\\1.cross_attn.\\2_layer_norm.weight"),
    (r"text\.cross_blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "{X}\\1.mlp.\\2_proj.weight"),
    (r"text\.cross_blocks\.(\d+)\.alpha_attn", "{X}\\1.alpha_cross_attn"),
    (r"text\.cross_blocks\.(\d+)\.alpha_mlp", "{X}\\1.alpha_dense"),
]

CONNECTOR_RULES = {
    "mlp": [(r"connector\.fc([12])\.(weight|bias)", "{C}linear_\\1.\\2")],
    "linear": [(r"connector\.proj\.(weight|bias)", "{C}{LINEAR}.\\1")],  # PaliGemma: `linear`
    "identity": [],
    "pixel_shuffle": [(r"connector\.proj\.weight", "{C}modality_projection.proj.weight")],
    "patch_merger": [
        (r"connector\.norm\.(weight|bias)", "{C}ln_q.\\1"),
        (r"connector\.mlp\.fc1\.(weight|bias)", "{C}mlp.0.\\1"),
        (r"connector\.mlp\.fc2\.(weight|bias)", "{C}mlp.2.\\1"),
    ],
    "pooled": [(r"connector\.weight", "{C}mm_input_projection_weight"),
               (r"connector\.norm\.weight", "{C}mm_soft_emb_norm.weight")],
    "idefics2": [
        (r"connector\.proj\.(gate|up|down)_proj\.weight", "{C}modality_projection.\\1_proj.weight"),
        (r"connector\.perceiver\.latents", "{C}perceiver_resampler.latents"),
        (r"connector\.perceiver\.norm\.weight", "{C}perceiver_resampler.norm.weight"),
        (r"connector\.perceiver\.layers\.(\d+)\.latents_norm\.weight",
         "{C}perceiver_resampler.layers.\\1.input_latents_norm.weight"),
        (r"connector\.perceiver\.layers\.(\d+)\.context_norm\.weight",
         "{C}perceiver_resampler.layers.\\1.input_context_norm.weight"),
        (r"connector\.perceiver\.layers\.(\d+)\.mlp_norm\.weight",
         "{C}perceiver_resampler.layers.\\1.post_attention_layernorm.weight"),
        (r"connector\.perceiver\.layers\.(\d+)\.attn\.([qkvo])_proj\.weight",
         "{C}perceiver_resampler.layers.\\1.self_attn.\\2_proj.weight"),
        (r"connector\.perceiver\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight",
         "{C}perceiver_resampler.layers.\\1.mlp.\\2_proj.weight"),
    ],
    "perceiver": [  # IDEFICS: blocks[i] = (attention, mlp)
        (r"connector\.latents", "{C}latents"),
        (r"connector\.norm\.(weight|bias)", "{C}layer_norm.\\1"),
        (r"connector\.layers\.(\d+)\.latents_norm\.(weight|bias)", "{C}blocks.\\1.0.latents_layer_norm.\\2"),
        (r"connector\.layers\.(\d+)\.context_norm\.(weight|bias)", "{C}blocks.\\1.0.context_layer_norm.\\2"),
        (r"connector\.layers\.(\d+)\.attn\.([qkv])_proj\.weight", "{C}blocks.\\1.0.\\2_proj.weight"),
        (r"connector\.layers\.(\d+)\.attn\.o_proj\.weight", "{C}blocks.\\1.0.output_proj.weight"),
        (r"connector\.layers\.(\d+)\.attn\.([qk])_norm\.(weight|bias)", "{C}blocks.\\1.0.\\2_layer_norm.\\3"),
        (r"connector\.layers\.(\d+)\.mlp_norm\.(weight|bias)", "{C}blocks.\\1.1.ln.\\2"),
        (r"connector\.layers\.(\d+)\.mlp\.fc1\.weight", "{C}blocks.\\1.1.fc.weight"),
        (r"connector\.layers\.(\d+)\.mlp\.fc2\.weight", "{C}blocks.\\1.1.c_proj.weight"),
    ],
}


# LLaVA-NeXT's learned row separator; `{N}` is only in that family's prefixes.
ANYRES_RULES = [(r"anyres\.image_newline", "{N}image_newline")]


# Mllama: its own vision names (local and global stacks, tile embeddings) and cross-attention layers that sit in the
# decoder's own stack; `stack_key` first renumbers our layer/block indexes to the checkpoint's stack indexes.
_MLLAMA_STACKS = [(r"vision\.layers\.(\d+)\.", "{V}transformer.layers.\\1."),
                  (r"vision\.global_layers\.(\d+)\.", "{V}global_transformer.layers.\\1.")]
MLLAMA_RULES = [
    (r"vision\.patch_embed\.weight", "{V}patch_embedding.weight"),
    (r"vision\.class_embed", "{V}class_embedding"),
    (r"vision\.pos_embed\.weight", "{V}gated_positional_embedding.embedding"),
    (r"vision\.pos_gate", "{V}gated_positional_embedding.gate"),
    (r"vision\.tile_pos_embed\.weight", "{V}gated_positional_embedding.tile_embedding.weight"),
    (r"vision\.(pre|post)_tile\.(embedding\.weight|gate)", "{V}\\1_tile_positional_embedding.\\2"),
    (r"vision\.pre_norm\.(weight|bias)", "{V}layernorm_pre.\\1"),
    (r"vision\.post_norm\.(weight|bias)", "{V}layernorm_post.\\1"),
    *[(ours + tail, hf + name) for ours, hf in _MLLAMA_STACKS for tail, name in [
        (r"norm1\.(weight|bias)", "input_layernorm.\\2"), (r"norm2\.(weight|bias)", "post_attention_layernorm.\\2"),
        (r"attn\.([qkvo])_proj\.weight", "self_attn.\\2_proj.weight"), (r"mlp\.(fc[12])\.(weight|bias)", "mlp.\\2.\\3"),
        (r"gate_attn", "gate_attn"), (r"gate_mlp", "gate_ffn")]],
    (r"connector\.proj\.(weight|bias)", "{C}\\1"),
    *TEXT_RULES,
    (r"text\.cross_blocks\.(\d+)\.attn_norm\.weight", "{X}\\1.input_layernorm.weight"),
    (r"text\.cross_blocks\.(\d+)\.mlp_norm\.weight", "{X}\\1.post_attention_layernorm.weight"),
    (r"text\.cross_blocks\.(\d+)\.([qkvo])_proj\.weight", "{X}\\1.cross_attn.\\2_proj.weight"),
    (r"text\.cross_blocks\.(\d+)\.([qk])_norm\.weight", "{X}\\1.cross_attn.\\2_norm.weight"),
    (r"text\.cross_blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "{X}\\1.mlp.\\2_proj.weight"),
    (r"text\.cross_blocks\.(\d+)\.alpha_attn", "{X}\\1.cross_attn_attn_gate"),
    (r"text\.cross_blocks\.(\d+)\.alpha_mlp", "{X}\\1.cross_attn_mlp_gate"),
]


def stack_key(cfg):
    """Mllama: our name -> the same name with decoder layer / cross block indexes of the checkpoint's one stack
    (self-attention and cross-attention layers interleaved); None for the other families."""
    if cfg is None or cfg.cross_attn is None or cfg.cross_attn.kind != "mllama":
        return None
    cross = sorted(cfg.cross_attn.layers)
    selfs = [j for j in range(cfg.text.num_layers + len(cross)) if j not in cross]
    pattern = re.compile(r"^text\.(layers|cross_blocks)\.(\d+)\.")

    def renumber(key: str) -> str:
        m = pattern.match(key)
        if m is None:
            return key
        index = (selfs if m.group(1) == "layers" else cross)[int(m.group(2))]
        return f"text.{m.group(1)}.{index}." + key[m.end():]

    return renumber


def family_rules(connector_kind: str, prefixes: dict, cfg=None) -> list:
    """The (our-name regex, HF-name template) rules of a family's layout."""
    if cfg is not None and cfg.family == "mllama":
        return MLLAMA_RULES
    # the patch merger comes with its own ViT (Qwen2-VL), whose blocks are named differently
    vision = QWEN_VISION_RULES if connector_kind == "patch_merger" else VISION_RULES
    rules = vision + TEXT_RULES + CROSS_ATTN_RULES + CONNECTOR_RULES[connector_kind]
    return rules + (ANYRES_RULES if "N" in prefixes else [])


def build_key_map(our_keys, connector_kind: str, prefixes: dict, cfg=None) -> dict:
    """our tensor name -> HF tensor name, for every name in `our_keys` (cfg: the model's VLMConfig, which Mllama
    needs: its rules and layer numbering)."""
    rules = family_rules(connector_kind, prefixes, cfg)
    # Layers with norms after each block too (Gemma 2/3) call the norm before the MLP pre_feedforward_layernorm.
    sandwich = any(".post_attn_norm." in k for k in our_keys)
    names = {"MLP_NORM": "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm",
             "LINEAR": "linear_1", **prefixes}
    compiled = [(re.compile(pattern + "$"), template.format(**names)) for pattern, template in rules]
    renumber = stack_key(cfg) or (lambda key: key)
    out = {}
    for key in our_keys:
        stacked = renumber(key)
        hits = [p.sub(t, stacked) for p, t in compiled if p.match(stacked)]
        if len(hits) != 1:
            raise KeyError(f"no unique checkpoint name for parameter {key!r} ({len(hits)} rules match)")
        out[key] = hits[0]
    return out


def normalize_names(names, aliases: list) -> dict:
    """file tensor name -> canonical name, rewriting the alternative prefixes other tools write
    (e.g. transformers' in-memory `model.language_model.` vs the saved `language_model.model.`)."""
    out = {}
    for name in names:
        canonical = name
        for old, new in aliases:
            if name.startswith(old):
                canonical = new + name[len(old):]
                break
        out[name] = canonical
    return out
