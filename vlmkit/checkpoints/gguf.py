"""GGUF import of a Llama-architecture text model: config, dequantized weights and tokenizer.

    cfg, state_dict, tokenizer = load_gguf_text("SmolLM2-135M-Instruct.Q4_1.gguf")
    decoder = TextDecoder(cfg); decoder.load_state_dict(state_dict, strict=True)

Weights come out as float32 torch tensors named as in notes/INTERNALS.md ("layers.0.attn.q_proj.weight", ...),
with q_proj/k_proj rows back in transformers' rotate-half order. The tokenizer is built the way transformers 5.x
builds it from the same file (integrations/gguf/gguf_tokenizer_mapping.py), so ids match transformers."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from ..config import TextConfig
from ..processing.tokenizer import Tokenizer

# llama.cpp token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the split regex its merges were learned with; copied from transformers 5.x, which uses
# GPT-2's ByteLevel regex for any name not listed (SmolLM2's "smollm" included).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRETOKENIZER_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
         "dbrx", "smaug-bpe"],
        _LLAMA3,
    ),  # fmt: skip
    "tekken": _TEKKEN,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}
# llama.cpp (and these models' own tokenizer.json) isolate every digit before the GPT-2 regex; transformers does
# not. Only reachable with pretokenizer="llama.cpp".
DIGIT_SPLITTING_PRETOKENIZERS = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


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


# ------------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level vocabularies are spelled in it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_backend(meta: dict, pretokenizer: str) -> BackendTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = meta["tokenizer.ggml.tokens"]
    # A token written in plain text (not the byte alphabet) is respelled, as transformers does.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = BackendTokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )  # fmt: skip
    pre = meta.get("tokenizer.ggml.pre")
    split = PRETOKENIZER_SPLITS.get(pre)
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    elif pretokenizer == "llama.cpp" and pre in DIGIT_SPLITTING_PRETOKENIZERS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _generate_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """A sentencepiece GGUF has no merges; recover them from the vocabulary, best score first
    (transformers' `generate_merges`, same tie-breaking)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        local = [(left, right, score) for left, right in splits if left in vocab and right in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_backend(meta: dict) -> BackendTokenizer:
    """transformers' LlamaTokenizer (legacy=False, add_prefix_space=True): byte-fallback BPE, "▁" for spaces."""
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _generate_merges(tokens, meta["tokenizer.ggml.scores"])
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return backend


def tokenizer_from_metadata(meta: dict, pretokenizer: str = "transformers") -> Tokenizer:
    """pretokenizer: "transformers" (default) reproduces transformers' ids; "llama.cpp" additionally isolates
    digits for the vocabularies llama.cpp does that for (e.g. "smollm"), which is also what those models'
    original tokenizer.json does."""
    if pretokenizer not in ("transformers", "llama.cpp"):
        raise ValueError(f"pretokenizer must be 'transformers' or 'llama.cpp', got {pretokenizer!r}")
    model = meta.get("tokenizer.ggml.model")
    arch = meta.get("general.architecture")
    if model == "llama" and arch in ("gemma", "gemma2", "gemma3", "phi3"):
        # transformers reshapes these vocabularies (space tokens, merge order, normalizer); not reproduced here.
        raise NotImplementedError(f"GGUF sentencepiece tokenizers of {arch!r} models are not supported")
    if model == "gpt2":
        backend = _byte_level_backend(meta, pretokenizer)
    elif model == "llama":
        backend = _sentencepiece_backend(meta)
    else:
        raise ValueError(
            f"GGUF tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' sentencepiece)"
        )
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    # Control tokens become special added tokens, user-defined ones plain added tokens, so both stay whole.
    # In a byte-level vocabulary a "control" token outside the byte alphabet is a llama.cpp mislabel: skipped.
    alphabet = set(_bytes_to_unicode().values()) if model == "gpt2" else None
    control = [t for t, k in zip(tokens, types) if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    known = backend.get_vocab(with_added_tokens=True)
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in known]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def token(key):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}  # fmt: skip
    # llama.cpp adds BOS to a sentencepiece vocabulary unless told otherwise; transformers follows.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", True if model == "llama" else False)
    # End-of-turn / end-of-message ids are stop tokens for llama.cpp; transformers ignores them.
    extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    return Tokenizer(
        backend,
        special_tokens=special,
        chat_template=meta.get("tokenizer.chat_template"),
        extra_eos_ids=extra_eos,
        add_bos_token=bool(add_bos),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


def tokenizer_from_gguf(path: str, pretokenizer: str = "transformers") -> Tokenizer:
    return tokenizer_from_metadata(read_metadata(open_gguf(path)), pretokenizer=pretokenizer)


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


def load_gguf_text(
    path: str, dtype: torch.dtype = torch.float32, pretokenizer: str = "transformers"
) -> tuple[TextConfig, dict[str, torch.Tensor], Tokenizer]:
    """(TextConfig, state dict for TextDecoder, Tokenizer) from a GGUF file. Every tensor is dequantized
    (gguf.quants handles Q4_0/Q4_1/Q5_x/Q8_0/K-quants/F16/BF16/F32) and cast to `dtype` one at a time, so peak
    memory is the output plus one float32 tensor."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = text_config_from_metadata(meta, names)
    state_dict = {}
    for tensor in reader.tensors:
        # numpy shape is GGUF's dims reversed, i.e. already torch's [out_features, in_features].
        array = dequantize(tensor.data, tensor.tensor_type)
        if array.dtype != np.float32 or not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, dtype=np.float32)  # F32 tensors come back as read-only views of the mmap
        weight = torch.from_numpy(array)
        if tensor.name.startswith("blk.") and ".attn_q." in tensor.name:
            weight = unpermute_rope_rows(weight, cfg.num_heads)
        elif tensor.name.startswith("blk.") and ".attn_k." in tensor.name:
            weight = unpermute_rope_rows(weight, cfg.num_kv_heads)
        state_dict[state_dict_name(tensor.name)] = weight.to(dtype).contiguous()
    embed = state_dict["embed_tokens.weight"]
    if cfg.vocab_size != embed.shape[0]:
        cfg.vocab_size = embed.shape[0]  # the tensor is the truth when metadata disagrees
    return cfg, state_dict, tokenizer_from_metadata(meta, pretokenizer=pretokenizer)
