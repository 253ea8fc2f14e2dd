"""The tokenizer a GGUF file's metadata describes, built the way transformers 5.x builds it from the same file
(integrations/gguf/gguf_tokenizer_mapping.py), so ids match transformers: byte-level BPE ("gpt2") and
sentencepiece ("llama") vocabularies."""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from ..checkpoints.gguf import open_gguf, read_metadata
from .tokenizer import Tokenizer

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
