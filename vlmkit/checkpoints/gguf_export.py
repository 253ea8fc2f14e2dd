"""GGUF export for llama.cpp / Ollama: a VLM as a text GGUF (Llama architecture) and an `mmproj` GGUF (vision tower +
projector), named and described as llama.cpp's own converter (convert_hf_to_gguf.py) writes them.

    text, mmproj = export_gguf(model, source_folder, "out/", "default", "q8_0")

Families: Idefics3 / SmolVLM (projector type "idefics3") and LLaVA-1.5 (projector type "mlp": llama.cpp's LLaVA graph
runs all but the last stored ViT layer and drops the class token, i.e. LLaVA-1.5's feature layer -2, "default";
byte-level BPE vocabularies only; llama.cpp's LLaVA graph puts the class token last, so its features differ from
transformers' on any file -- see the README). Tensor types follow the converter: 1-D tensors and norms F32,
2-D weights at the chosen type (F16 where a row is not a whole number of blocks), the ViT's embeddings F32; q/k rows
permuted into llama.cpp's interleaved RoPE layout. The tokenizer metadata (`tokenizer.ggml.*`) is written from the
source folder's tokenizer.json with gguf's own SpecialVocab (merges, special ids, chat template)."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, SpecialVocab, TokenType, VisionProjectorType
from gguf.quants import QuantError, quantize

from ..models.quant import quantization_of
from .folder_config import CheckpointError, image_config_from_folder

# --gguf-type -> (tensor type of 2-D weights, general.file_type)
GGUF_TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}
# llama.cpp's converter writes mmproj files at f32/f16/bf16/q8_0 only; 4-bit text files get an f16 projector.
MMPROJ_TYPES = {"f32": "f32", "f16": "f16", "q8_0": "q8_0", "q4_0": "f16", "q4_1": "f16"}

# tokenizer.ggml.pre from the hash of the converter's check text (convert_hf_to_gguf.py, get_vocab_base_pre).
_CHK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}

_TEXT_LAYER = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
               "attn.o_proj": "attn_output", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TEXT_TOP = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
_VISION_LAYER = {"norm1": "ln1", "norm2": "ln2", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
                 "attn.v_proj": "attn_v", "attn.o_proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
_VISION_TOP = {"vision.patch_embed": "v.patch_embd", "vision.pos_embed": "v.position_embd",
               "vision.pre_norm": "v.pre_ln", "vision.post_norm": "v.post_ln", "connector.proj": "mm.model.fc",
               "connector.fc1": "mm.0", "connector.fc2": "mm.2"}
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def text_tensor_name(ours: str) -> str:
    """vlmkit's decoder name ("text.layers.3.attn.q_proj.weight") -> llama.cpp's ("blk.3.attn_q.weight")."""
    module, _, leaf = ours.removeprefix("text.").rpartition(".")
    if module.startswith("layers."):
        _, index, rest = module.split(".", 2)
        if rest in _TEXT_LAYER:
            return f"blk.{index}.{_TEXT_LAYER[rest]}.{leaf}"
    elif module in _TEXT_TOP:
        return f"{_TEXT_TOP[module]}.{leaf}"
    raise CheckpointError(f"tensor {ours!r} has no place in a llama.cpp Llama GGUF")


def mmproj_tensor_name(ours: str) -> str:
    """vlmkit's vision/connector name -> llama.cpp's mmproj name (clip-impl.h TN_*)."""
    if ours == "vision.class_embed":
        return "v.class_embd"
    module, _, leaf = ours.rpartition(".")
    if module.startswith("vision.layers."):
        _, _, index, rest = module.split(".", 3)
        if rest in _VISION_LAYER:
            return f"v.blk.{index}.{_VISION_LAYER[rest]}.{leaf}"
    elif module in _VISION_TOP:
        return f"{_VISION_TOP[module]}.{leaf}"
    raise CheckpointError(f"tensor {ours!r} has no place in a llama.cpp mmproj")


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The converter's LlamaModel.permute: each head's rows from rotate-half pairs (i, i + d/2) to interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _add(writer: GGUFWriter, name: str, t: torch.Tensor, qtype: GGMLQuantizationType, force_f32: bool) -> None:
    data = t.detach().to(torch.float32).cpu().numpy()
    if data.ndim <= 1 or name.endswith("_norm.weight") or force_f32 or not name.endswith(".weight"):
        qtype = GGMLQuantizationType.F32
    try:
        packed = quantize(data, qtype)
    except QuantError:  # a row that is not a whole number of blocks: the converter falls back to F16
        qtype = GGMLQuantizationType.F16
        packed = quantize(data, qtype)
    writer.add_tensor(name, packed, raw_dtype=qtype)


def float_state(model) -> dict:
    if quantization_of(model):
        raise CheckpointError("GGUF export needs a float model, but this one is quantized: load it without "
                              "quantize= (the GGUF type is chosen with gguf_type)")
    return model.state_dict()


# ------------------------------------------------------------------------------------------------ tokenizer
def tokenizer_pre(tokenizer_json: Path) -> str:
    """The converter hashes the ids of its check text as transformers encodes it (special tokens added); a
    tokenizer that adds a BOS (LLaVA's) hashes unlike its pre-tokenizer's entry, so the bare ids are tried next."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    for specials in (True, False):
        digest = sha256(str(tok.encode(_CHK_TEXT, add_special_tokens=specials).ids).encode()).hexdigest()
        if digest in _PRE_BY_HASH:
            return _PRE_BY_HASH[digest]
    raise CheckpointError(f"{tokenizer_json}: its pre-tokenizer (hash {digest}) is not one llama.cpp is known "
                          f"to implement here (known: {sorted(_PRE_BY_HASH.values())})")


def add_tokenizer(writer: GGUFWriter, folder: Path, vocab_size: int) -> list[str]:
    """tokenizer.ggml.* as the converter's _set_vocab_gpt2 writes them (byte-level BPE vocabularies)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json to write the GGUF vocabulary from")
    tj = json.loads(path.read_text(encoding="utf-8"))
    if tj.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")):
        raise CheckpointError(f"{path}: only byte-level BPE vocabularies are exported; sentencepiece-style ones "
                              "(Llama 2's, LLaVA-1.5's) need llama.cpp's 'llama' tokenizer model, not written here")
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    size = max(vocab_size, max(by_id) + 1, max(added, default=-1) + 1)
    tokens, types = [], []
    for i in range(size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
    return tokens


# ------------------------------------------------------------------------------------------------ writers
def write_text_gguf(state: dict, cfg, folder: Path, path: Path, gguf_type: str, name: str) -> None:
    t = cfg.text
    if cfg.family not in ("idefics3", "smolvlm", "llava") or t.gemma_norm or t.qk_norm or t.mrope_section \
            or t.rope_scaling:
        raise CheckpointError(f"GGUF export supports Idefics3 / SmolVLM and LLaVA-1.5 (Llama decoder), "
                              f"not {cfg.family!r}")
    qtype, ftype = GGUF_TYPES[gguf_type]
    writer = GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(ftype)
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_block_count(t.num_layers)
    writer.add_head_count(t.num_heads)
    writer.add_head_count_kv(t.num_kv_heads)
    writer.add_rope_freq_base(t.rope_theta)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_rope_dimension_count(t.head_dim)
    if t.head_dim != t.hidden_size // t.num_heads:
        writer.add_key_length(t.head_dim)
        writer.add_value_length(t.head_dim)
    tokens = add_tokenizer(writer, folder, t.vocab_size)
    writer.add_vocab_size(len(tokens))
    for ours, w in state.items():
        if not ours.startswith("text.") or (t.tie_word_embeddings and ours == "text.lm_head.weight"):
            continue
        gname = text_tensor_name(ours)
        if ".attn_q." in gname:
            w = permute_rope_rows(w, t.num_heads)
        elif ".attn_k." in gname:
            w = permute_rope_rows(w, t.num_kv_heads)
        _add(writer, gname, w, qtype, force_f32=False)
    _finish(writer)


def _mmproj_kind(cfg) -> str:
    v, k = cfg.vision, cfg.connector
    if k.kind == "pixel_shuffle" and v.flavour == "clip" and not v.class_token:
        return VisionProjectorType.IDEFICS3
    if cfg.family == "llava" and k.kind == "mlp" and v.class_token and k.bias:
        if v.feature_layer != -2 or not v.drop_class_token:
            raise CheckpointError("llama.cpp's LLaVA graph takes ViT layer -2 without the class token; this model "
                                  f"uses layer {v.feature_layer}, drop_class_token={v.drop_class_token}")
        return "mlp"
    raise CheckpointError(f"mmproj export supports Idefics3 / SmolVLM and LLaVA-1.5, not {cfg.family!r}")


def write_mmproj_gguf(state: dict, cfg, image_cfg: dict, path: Path, gguf_type: str, name: str) -> None:
    v, k = cfg.vision, cfg.connector
    kind = _mmproj_kind(cfg)
    qtype, ftype = GGUF_TYPES[gguf_type]
    writer = GGUFWriter(str(path), "clip")
    writer.add_type("mmproj")
    writer.add_name(name)
    writer.add_file_type(ftype)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(cfg.text.hidden_size)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.num_layers)
    writer.add_vision_head_count(v.num_heads)
    writer.add_vision_image_mean([float(x) for x in image_cfg.get("image_mean", OPENAI_CLIP_MEAN)])
    writer.add_vision_image_std([float(x) for x in image_cfg.get("image_std", OPENAI_CLIP_STD)])
    writer.add_clip_projector_type(kind)
    writer.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    if kind == "mlp":  # clip.cpp: no use_gelu -> quick GELU (CLIP's)
        if v.act not in ("quick_gelu", "gelu") or k.act != "gelu":
            raise CheckpointError(f"llama.cpp's LLaVA runs a quick-GELU/GELU ViT and a GELU projector, not "
                                  f"{v.act!r} / {k.act!r}")
        if v.act == "gelu":
            writer.add_vision_use_gelu(True)
    else:
        if v.act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            raise CheckpointError(f"llama.cpp's idefics3 ViT runs GELU; this one uses {v.act!r}")
        writer.add_vision_projector_scale_factor(k.scale_factor)
        writer.add_vision_use_gelu(True)
        writer.add_vision_preproc_image_size(int(image_cfg.get("size", {}).get("longest_edge", v.image_size)))
    for ours, w in state.items():
        if not ours.startswith(("vision.", "connector.")) or (kind == "mlp" and ours.startswith("vision.post_norm")):
            continue  # LLaVA's features come before CLIP's post-layernorm, which llama.cpp would apply
        gname = mmproj_tensor_name(ours)
        if gname.startswith("v.patch_embd") and gname.endswith("weight") and w.ndim != 4:
            raise CheckpointError(f"{ours}: expected a 4-D patch convolution, got {tuple(w.shape)}")
        if kind == "mlp" and gname == "v.patch_embd.weight" and gguf_type == "f16":
            force = False  # MmprojModel.tensor_force_quant: the patch convolution F16 in f16 files, else F32
        else:  # SmolVLMModel.tensor_force_quant: the ViT's embeddings F32 (the position table always is)
            force = gname.startswith(("v.patch_embd", "v.position_embd"))
        _add(writer, gname, w, GGMLQuantizationType.F16 if gname == "v.patch_embd.weight" and not force else qtype,
             force_f32=force)
    _finish(writer)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model, folder, out_dir, name: str, gguf_type: str = "f16") -> tuple[Path, Path]:
    """`model` (a float VLMModel loaded from `folder`, whose tokenizer and processor files describe it) as
    `<out_dir>/<name>-<type>.gguf` and `<out_dir>/mmproj-<name>-<mmproj type>.gguf`; returns both paths."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; expected one of {sorted(GGUF_TYPES)}")
    folder, out = Path(folder), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, cfg = float_state(model), model.cfg
    text_path = out / f"{name}-{gguf_type}.gguf"
    mm_type = MMPROJ_TYPES[gguf_type]
    mm_path = out / f"mmproj-{name}-{mm_type}.gguf"
    write_mmproj_gguf(state, cfg, image_config_from_folder(folder), mm_path, mm_type, name)
    write_text_gguf(state, cfg, folder, text_path, gguf_type, name)
    return text_path, mm_path

