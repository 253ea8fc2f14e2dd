"""GGUF import of a Llama-architecture text model: its config and its weights, as a tensor source.

    cfg, state_dict = load_gguf_text("SmolLM2-135M-Instruct.Q4_1.gguf")
    decoder = TextDecoder(cfg); decoder.load_state_dict(state_dict, strict=True)

Weights come out as float32 torch tensors named as in docs/INTERNALS.md ("layers.0.attn.q_proj.weight", ...),
with q_proj/k_proj rows back in transformers' rotate-half order; quantized loads take Q4_1 blocks over as int4
modules as they are. The file's tokenizer: vlmkit.processing.gguf_tokenizer."""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from ..config import TextConfig
from ..models.quant import from_q4_1, int8_embedding_by_rows
from .builder import TensorSource


class _FastGGUFReader(GGUFReader):
    """GGUFReader with its one hot helper reading from a plain ndarray view of the file instead of the memmap:
    numpy.memmap's per-slice subclass bookkeeping made parsing SmolLM2's ~100k vocabulary strings take ~5 s
    (now ~1.4 s). Same bytes, same semantics; `open_gguf` falls back to the stock reader if this ever breaks."""

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain_data")
        if plain is None:
            plain = self.__dict__["_plain_data"] = self.data.view(np.ndarray)
        dtype, count = np.dtype(dtype), int(count)
        arr = plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def open_gguf(path: str) -> GGUFReader:
    try:
        return _FastGGUFReader(path)
    except Exception:
        return GGUFReader(path)  # re-raises the real error for a bad file; survives gguf internals changing


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key/value as Python values (strings decoded leniently: some vocabularies hold invalid UTF-8)."""
    meta = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        kind, last = field.types[0], field.types[-1]
        if kind == GGUFValueType.ARRAY and last == GGUFValueType.STRING:
            meta[key] = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        elif kind == GGUFValueType.ARRAY:
            meta[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif kind == GGUFValueType.STRING:
            meta[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        else:
            meta[key] = field.parts[field.data[0]].tolist()[0]
    return meta


# ------------------------------------------------------------------------------------------------- model
SUPPORTED_ARCHITECTURES = ("llama",)  # Mistral GGUFs also say "llama"

_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def text_config_from_metadata(meta: dict, tensor_names: set[str]) -> TextConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise NotImplementedError(f"RoPE scaling ({scaling!r} / rope_freqs) is not supported by TextDecoder")
    if meta.get(f"{arch}.expert_count"):
        raise NotImplementedError("mixture-of-experts GGUFs are not supported")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length") or hidden // heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise NotImplementedError("partial rotary embeddings are not supported by TextDecoder")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])) or None
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=head_dim,
        # Kept as the file's float32 value (SmolLM2: 9.99999975e-06, not 1e-05), as transformers keeps it.
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=get("rope.freq_base", 10000.0),
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders each head's q/k rows from rotate-half pairs (i, i + d/2) to interleaved
    pairs (2i, 2i + 1), its RoPE layout: `w.reshape(n, 2, d/2, ...).swapaxes(1, 2)`. This is the inverse.
    Rows are independent under quantization (blocks run along columns), so it is exact after dequantizing."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def state_dict_name(gguf_name: str) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    match = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[match.group(1)]}.{match.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in TextDecoder")


def grow_rows(table: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """A token table grown to `vocab_size` rows with zeros: tokens added after the file (image placeholders,
    replaced by features; with a zero row in the tied head they never win a greedy step)."""
    if not vocab_size or vocab_size <= table.shape[0]:
        return table
    return torch.cat([table, table.new_zeros(vocab_size - table.shape[0], table.shape[1])])


class GGUFSource(TensorSource):
    """A GGUF text model's tensors under the decoder's names (after `prefix`, "text." inside a VLM), dequantized one
    at a time, q/k rows back in rotate-half order; the token table grown to `vocab_size` rows (`grow_rows`)."""

    what = "GGUF"

    def __init__(self, reader: GGUFReader, cfg: TextConfig, prefix: str = "", vocab_size: Optional[int] = None):
        self.origin, self.cfg, self.vocab_size = getattr(reader.data, "filename", "GGUF"), cfg, vocab_size
        self.tensors = {prefix + state_dict_name(t.name): t for t in reader.tensors}

    def keys(self, expected: Optional[dict] = None) -> list[str]:
        return list(self.tensors)

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name].n_bytes)

    def _heads(self, name: str) -> Optional[int]:
        t = self.tensors[name]
        if t.name.startswith("blk.") and ".attn_q." in t.name:
            return self.cfg.num_heads
        if t.name.startswith("blk.") and ".attn_k." in t.name:
            return self.cfg.num_kv_heads
        return None

    def read(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        # numpy shape is GGUF's dims reversed, i.e. already torch's [out_features, in_features].
        array = dequantize(t.data, t.tensor_type)
        if array.dtype != np.float32 or not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, dtype=np.float32)  # F32 tensors come back as read-only views of the mmap
        w = torch.from_numpy(array)
        heads = self._heads(name)
        if heads:
            w = unpermute_rope_rows(w, heads)
        return grow_rows(w, self.vocab_size) if self.tensors[name].name == "token_embd.weight" else w

    def read_quantized(self, name: str, kind: str, dtype: torch.dtype):
        t = self.tensors[name]
        if len(t.shape) != 2:
            return None
        cols, rows = (int(x) for x in t.shape)
        if kind == "int4" and t.tensor_type == GGMLQuantizationType.Q4_1:
            heads = self._heads(name)
            order = unpermute_rope_rows(torch.arange(rows), heads) if heads else None
            return from_q4_1(t.data, rows, cols, dtype, order)
        if kind == "embed8":  # row chunks: never the float table (nor its grown copy) at once
            def read_rows(start, stop):
                return torch.from_numpy(np.asarray(dequantize(t.data[start:stop], t.tensor_type), dtype=np.float32))

            return int8_embedding_by_rows(read_rows, rows, cols, self.vocab_size or rows, dtype)
        return None


def load_gguf_text(path: str, dtype: torch.dtype = torch.float32) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """(TextConfig, state dict for TextDecoder) from a GGUF file. Every tensor is dequantized (gguf.quants handles
    Q4_0/Q4_1/Q5_x/Q8_0/K-quants/F16/BF16/F32) and cast to `dtype` one at a time, so peak memory is the output plus
    one float32 tensor. The tokenizer: vlmkit.processing.gguf_tokenizer.tokenizer_from_gguf."""
    reader = open_gguf(path)
    cfg = text_config_from_metadata(read_metadata(reader), {t.name for t in reader.tensors})
    source = GGUFSource(reader, cfg)
    state_dict = {name: source.read(name).to(dtype).contiguous() for name in source.keys()}
    embed = state_dict["embed_tokens.weight"]
    if cfg.vocab_size != embed.shape[0]:
        cfg.vocab_size = embed.shape[0]  # the tensor is the truth when metadata disagrees
    return cfg, state_dict
