"""The text tokenizer: a `tokenizers.Tokenizer` plus what transformers keeps beside it (special tokens, BOS/EOS
rules, chat template, stop ids), read from a Hugging Face folder (a GGUF file's: gguf_tokenizer.py). No
transformers at runtime.

Behaviour follows transformers 5.x `TokenizersBackend` so prompts encode to the same ids and generations decode to
the same text as transformers would produce for the same checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Optional, Union

from tokenizers import AddedToken, Encoding, processors
from tokenizers import Tokenizer as BackendTokenizer

from ..checkpoints.io import read_json

# Named special tokens transformers knows; each is also passed to chat templates under this name.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> Optional[str]:
    """tokenizer_config values are a string or a serialized AddedToken ({"content": ..., ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (`.backend`).

    special_tokens: {"bos_token": "<s>", ...}; named extras (e.g. "image_token") are allowed and reach templates.
    add_bos_token / add_eos_token: None keeps the backend's post-processor (as tokenizer.json ships it); a bool
    rebuilds it as transformers' `update_post_processor` does (GGUF files state these flags).
    extra_eos_ids: further stop ids (generation_config.json's list, GGUF end-of-turn ids).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Optional[dict[str, str]] = None,
        chat_template: Union[str, dict, None] = None,
        extra_eos_ids: Iterable[int] = (),
        add_bos_token: Optional[bool] = None,
        add_eos_token: Optional[bool] = None,
        extra_special_tokens: Iterable[str] = (),
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        # transformers skips this clean-up for BPE models because it corrupts their output (" ." -> ".").
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        # Like transformers: named and extra special tokens that are not added tokens yet become special ones, so
        # they are matched whole in text and skipped when decoding.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        wanted = list(self.special_tokens.values()) + [t for t in extra_special_tokens if t]
        missing = [t for t in wanted if t not in added]
        if missing:
            self.add_special_tokens(list(dict.fromkeys(missing)))
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._set_bos_eos_post_processor(bool(add_bos_token), bool(add_eos_token))
        eos = [self.eos_token_id] if self.eos_token_id is not None else []
        self._eos_ids = list(dict.fromkeys(eos + [int(i) for i in extra_eos_ids]))
        self._plain: Optional[BackendTokenizer] = None  # built on first use by _plain_backend

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, path: str) -> "Tokenizer":
        """A Hugging Face folder: tokenizer.json, tokenizer_config.json, special_tokens_map.json, the chat template
        (chat_template.jinja, additional_chat_templates/, chat_template.json, or inside tokenizer_config.json) and
        generation_config.json's eos ids."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{path} has no tokenizer.json (slow-only tokenizers are not supported)")
        backend = BackendTokenizer.from_file(tokenizer_file)
        config = read_json(os.path.join(path, "tokenizer_config.json"))

        # added_tokens_decoder entries the backend lacks (tokenizer.json normally lists them all already).
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        for _, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if spec["content"] not in present:
                props = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
                backend.add_tokens([AddedToken(spec["content"], **props)])

        # special_tokens_map.json overrides tokenizer_config.json, as in transformers' loader.
        settings = {**config, **read_json(os.path.join(path, "special_tokens_map.json"))}
        special = {name: _token_text(settings.get(name)) for name in SPECIAL_TOKEN_NAMES}
        extras: list[str] = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = settings.get(key) or []
            if isinstance(value, dict):  # transformers 5 names extras, e.g. {"image_token": "<image>"}
                special.update({k: _token_text(v) for k, v in value.items()})
            else:
                extras += [_token_text(v) for v in value]

        generation = read_json(os.path.join(path, "generation_config.json"))
        gen_eos = generation.get("eos_token_id")
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)

        return cls(
            backend,
            special_tokens=special,
            chat_template=_read_chat_template(path, config),
            extra_eos_ids=gen_eos,
            # add_bos_token / add_eos_token are ignored on purpose: with a tokenizer.json, transformers 5 drops
            # them too and the file's post-processor alone decides BOS/EOS.
            extra_special_tokens=extras,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # ----------------------------------------------------------------------------------------------- basics
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # the backend's message ("TextInputSequence must be str") hides the usual cause
            lone = re.search("[\ud800-\udfff]", text) if isinstance(text, str) else None
            if lone is None:
                raise
            raise ValueError(f"the text holds a lone UTF-16 surrogate {lone.group()!r} at character {lone.start()}, "
                             "which is not valid Unicode and cannot be tokenized") from None

    def encode_runs(self, runs: Iterable[tuple[str, bool]], add_special_tokens: bool = True) -> list[int]:
        """Text in runs of (text, literal): literal runs are plain text (the added tokens written in them are not
        matched, they encode as their characters); BOS/EOS are added around the whole, as encode() would."""
        pieces = [(self._plain_backend() if literal else self.backend).encode(text, add_special_tokens=False)
                  for text, literal in runs if text]
        if not pieces:
            return self.encode("", add_special_tokens=add_special_tokens)
        merged = Encoding.merge(pieces, growing_offsets=True)
        return self.backend.post_process(merged, add_special_tokens=add_special_tokens).ids

    def _plain_backend(self) -> BackendTokenizer:
        """The same tokenizer without its added-token matching: text in, the ids of its characters out."""
        if self._plain is None:
            spec = json.loads(self.backend.to_str())
            spec["added_tokens"] = []
            self._plain = BackendTokenizer.from_str(json.dumps(spec))
        return self._plain

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(int(token_id))

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Including added tokens (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _special_id(self, name: str) -> Optional[int]:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._special_id("eos_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Stop ids: the eos token, then generation_config's (or the GGUF's end-of-turn) ids."""
        return list(self._eos_ids)

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> Optional[int]:
        return self._special_id("unk_token")

    @property
    def special_ids(self) -> set[int]:
        """Ids of every added token flagged special: what `decode(skip_special_tokens=True)` drops."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def add_special_tokens(self, tokens: list[str]) -> int:
        """Add family tokens (e.g. "<image>") as special tokens, matched whole and skipped on decode. Tokens already
        in the vocabulary keep their id. Returns how many new ids were created."""
        specs = [AddedToken(t, special=True, normalized=False) for t in tokens]
        return self.backend.add_special_tokens(specs)

    def _set_bos_eos_post_processor(self, add_bos: bool, add_eos: bool):
        """transformers' `update_post_processor`: BOS/EOS around each sequence when the flags say so."""
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = ([(bos, self.token_to_id(bos))] if add_bos else []) + (
            [(eos, self.token_to_id(eos))] if add_eos else []
        )
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    # ----------------------------------------------------------------------------------------------- chat
    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: Optional[str] = None,
        tools: Optional[list[dict]] = None,
        documents: Optional[list[dict]] = None,
        **kwargs,
    ) -> str:
        """The chat template rendered as transformers' `apply_chat_template(tokenize=False)` renders it: same
        sandboxed environment and globals; the special tokens are template variables; None-valued message keys are
        dropped; anything that is not plain JSON data (images, tensors) is seen by the template as "<TypeName>"."""
        template = self._pick_template(chat_template, tools)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = _plain({**self.special_tokens, **kwargs})
        return _compile_template(template).render(
            messages=_plain(messages),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    def _pick_template(self, chat_template: Optional[str], tools) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ValueError(f"several chat templates and none is 'default': {sorted(templates)}")
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template=...")
        return templates

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Streaming detokenisation: `push(id)` returns the new text (maybe ""), `finish()` the rest. The pieces
    concatenate to `tokenizer.decode(all_ids)`; a piece never ends inside a UTF-8 character.

    Decoding id by id is wrong (byte-level tokens split characters; sentencepiece decoders strip the first
    token's space), so each step decodes a short window twice, with and without the new ids, and emits the
    difference. The window starts at an already-emitted token that is not skipped, so whatever the decoder does
    to a window's first token happens to both decodes alike.

    Byte-fallback vocabularies (Llama's "<0x0A>" ...) need one more rule: the ByteFallback decoder turns a whole
    run of byte tokens into U+FFFDs when the run is not valid UTF-8, valid bytes included, so text is held back
    until the run ends."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped = tokenizer.special_ids if skip_special_tokens else set()
        self._byte_ids: set[int] = set()
        backend = getattr(tokenizer, "backend", None)  # duck-typed tokenizers (tests) may have none
        if backend is not None and getattr(backend.model, "byte_fallback", False):
            byte_token = re.compile(r"<0x[0-9A-Fa-f]{2}>")
            self._byte_ids = {i for t, i in tokenizer.get_vocab().items() if byte_token.fullmatch(t)}
        self.ids: list[int] = []
        self._start = 0  # window start
        self._emitted_end = 0  # ids[:_emitted_end] are fully emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        fresh = range(len(self.ids) - 1, self._emitted_end - 1, -1)
        last = next((i for i in fresh if self.ids[i] not in self._skipped), None)  # last visible new token
        if last is None or self.ids[last] in self._byte_ids:
            return ""  # only skipped tokens so far, or a byte-fallback run still open
        done = self._decode(self.ids[self._start : self._emitted_end])
        text = self._decode(self.ids[self._start :])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""  # nothing visible yet, or a character still incomplete
        self._start = last
        self._emitted_end = len(self.ids)
        return text[len(done) :]

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD, as in the full decode)."""
        done = self._decode(self.ids[self._start : self._emitted_end])
        text = self._decode(self.ids[self._start :])
        self._emitted_end = len(self.ids)
        return text[len(done) :]

    def __call__(self, ids: Iterable[int]):
        """Generator form: yields the non-empty pieces for `ids`, then the remainder."""
        for token_id in ids:
            piece = self.push(token_id)
            if piece:
                yield piece
        rest = self.finish()
        if rest:
            yield rest


# --------------------------------------------------------------------------------------------------- helpers
def _read_chat_template(path: str, config: dict) -> Union[str, dict, None]:
    """transformers 5.x writes the template to chat_template.jinja (tokenizer and processor alike) and extra named
    ones to additional_chat_templates/*.jinja; older processors used chat_template.json, older tokenizers
    tokenizer_config.json ("chat_template": a string or a list of {"name", "template"})."""
    template: Union[str, dict, None] = None
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    elif os.path.isfile(os.path.join(path, "chat_template.json")):
        template = read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    else:
        template = config.get("chat_template")
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}
    extra_dir = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        named = {}
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                    named[name[: -len(".jinja")]] = f.read()
        if named:
            template = {**named, **({"default": template} if isinstance(template, str) else template or {})}
    return template


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (only used for non-BPE tokenizers that ask for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(before, after)
    return text


def _plain(value: Any) -> Any:
    """Only plain JSON data reaches a (Hub-supplied, untrusted) template: rich objects such as PIL images have
    methods the sandbox does not know are dangerous, so they become an inert "<TypeName>" string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalar
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=32)
def _compile_template(template: str):
    """The environment transformers builds in chat_template_utils: immutable sandbox, trim/lstrip blocks,
    loop controls, its `tojson` (no HTML escaping, ensure_ascii=False), raise_exception, strftime_now, and
    restricted `dict` / `namespace`."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # `dict(...)` without exposing the dict type itself to attribute tricks.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Refuse underscore attributes so a template cannot reach CPython internals through a namespace.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(), namespace=TemplateNamespace
    )
    return env.from_string(template)
