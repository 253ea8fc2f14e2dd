"""The fast decode path and the caches give the tokens of the plain path: static KV cache (eager views and the
fixed-shape whole-buffer step), grouped-query attention without repeated keys, the image-feature cache and the
prefix (KV) cache of a second chat turn."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from hf_fixtures import sample_images
from vlmkit.config import TextConfig
from vlmkit.generation.caches import PrefixCache, PrefixEntry, crop_digest
from vlmkit.generation.loop import GenerationConfig, generate_tokens
from vlmkit.models.kv_cache import KVCache, StaticKVCache
from vlmkit.models.layers import attention
from vlmkit.models.text import TextDecoder, grouped_attention

A, B = sample_images()


def tiny_decoder(seed=0, **kw) -> TextDecoder:
    torch.manual_seed(seed)
    cfg = TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=512, **kw)
    model = TextDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)  # large weights: confident, varied greedy tokens
    return model


def left_pad(rows):
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


BATCH = left_pad([[5, 6, 7, 8, 9, 10], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47]])


def run(model, cache_factory, n=40, do_sample=False, seed=None):
    cfg = GenerationConfig(max_new_tokens=n, do_sample=do_sample, seed=seed)
    return torch.stack(list(generate_tokens(model, BATCH, cfg, cache=cache_factory())), 1)


def test_static_cache_gives_the_concatenating_cache_tokens():
    model = tiny_decoder()
    ref = run(model, KVCache)
    # initial capacity 4 < the prompt: the buffers grow (by doubling) during prefill and decode
    assert torch.equal(run(model, lambda: StaticKVCache(len(model.layers), 64, initial=4)), ref)
    assert torch.equal(run(model, lambda: None), ref)  # the default for vlmkit decoders: static
    sampled = run(model, KVCache, do_sample=True, seed=3)
    assert torch.equal(run(model, lambda: StaticKVCache(len(model.layers), 64), do_sample=True, seed=3), sampled)


def test_whole_buffer_decode_step_gives_the_same_tokens():
    """The fixed-shape step torch.compile sees, run eagerly: whole buffers + key mask instead of views."""
    model = tiny_decoder(seed=1)
    ref = run(model, KVCache)
    model._compiled_decode = model._decode_step  # what compile_decode installs, minus the compilation
    try:
        cache = StaticKVCache(len(model.layers), 64)
        out = torch.stack(list(generate_tokens(model, BATCH, GenerationConfig(max_new_tokens=40), cache=cache)), 1)
    finally:
        del model._compiled_decode
    assert torch.equal(out, ref)
    assert cache.capacity % 256 == 0 and cache.length == BATCH["input_ids"].shape[1] + 39


def test_prefilled_cache_feeds_only_the_new_tokens():
    model = tiny_decoder(seed=2)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    full = StaticKVCache(len(model.layers), 64)
    ref = torch.stack(list(generate_tokens(model, batch, GenerationConfig(max_new_tokens=12), cache=full)), 1)
    assert torch.equal(full.token_ids[0, :7], ids[0])  # the loop records what it fed
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        reused = StaticKVCache.from_prefix([k[:, :, :5] for k in full.keys], [v[:, :, :5] for v in full.values],
                                           ids[:, :5], 64)
        out = torch.stack(list(generate_tokens(model, batch, GenerationConfig(max_new_tokens=12), cache=reused)), 1)
    finally:
        hook.remove()
    assert seen == [2] and torch.equal(out, ref)  # prefill read 2 tokens, not 7; decode steps skip forward()


@pytest.mark.parametrize("t", [1, 5])
def test_grouped_attention_equals_repeated_keys(t):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, t, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.rand(2, 1, t, 9) > 0.3
    mask[..., -1] = True
    ref = attention(q, k, v, mask)  # repeat_interleave of the key/value heads
    torch.testing.assert_close(grouped_attention(q, k, v, mask), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped_attention(q, k, v, None), attention(q, k, v, None), rtol=1e-5, atol=1e-6)


def test_crop_digest_is_content():
    x = torch.rand(3, 8, 8)
    assert crop_digest(x) == crop_digest(x.clone()) != crop_digest(x + 1e-3)
    m = torch.ones(8, 8, dtype=torch.long)
    assert crop_digest(x, m) != crop_digest(x, m * 0)


def test_prefix_lookup_stops_at_the_first_different_image():
    cache = PrefixCache()
    ids = torch.tensor([1, 2, 9, 9, 3, 9, 9, 4, 5])  # two crops of 2 image tokens (id 9)
    kv = [torch.zeros(1, 1, 9, 2)]
    cache.store(PrefixEntry(ids, ("a", "b"), (2, 5), kv, kv))
    longer = torch.cat([ids, torch.tensor([6, 7])])
    assert cache.lookup(longer, ("a", "b"), (2, 5))[1] == 9
    assert cache.lookup(longer, ("a", "c"), (2, 5))[1] == 5  # crop "b" changed: reuse ends where it starts
    assert cache.lookup(ids, ("a", "b"), (2, 5))[1] == 8  # the last prompt token always runs
    assert cache.lookup(torch.tensor([8, 2]), (), ())[0] is None


# ------------------------------------------------------------------------------------------------ the VLM

@pytest.fixture(scope="module")
def pair(hf_checkpoint_dir):
    folder = hf_checkpoint_dir("idefics3")
    return vlmkit.load(folder), vlmkit.load(folder, caches=False)


def _messages(answer):
    first = [{"role": "user", "content": [{"type": "image", "image": A}, {"type": "text", "text": "What is it?"}]}]
    return first, first + [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                           {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]}]


def _chat(m, stream=False):
    a1 = m.chat(_messages("")[0], max_new_tokens=6)
    second = _messages(a1)[1]
    a2 = "".join(m.chat(second, max_new_tokens=6, stream=True)) if stream else m.chat(second, max_new_tokens=6)
    return a1, a2


@pytest.mark.parametrize("stream", [False, True])
def test_second_turn_reuses_image_and_prefix_with_the_same_answer(pair, stream):
    cached, plain = pair
    cached.clear_caches()
    expected = _chat(plain)
    encodes, prefill = [], []
    enc = cached.model.encode_images
    hook = cached.model.text.register_forward_pre_hook(
        lambda mod, args, kwargs: prefill.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    cached.model.encode_images = lambda *a, **k: encodes.append(1) or enc(*a, **k)
    try:
        assert _chat(cached, stream) == expected
    finally:
        hook.remove()
        del cached.model.encode_images
    assert len(encodes) == 1  # the second turn took the image's features from the cache
    # the second prefill read at most what follows the first prompt: not the image, not the first question
    first, second = (plain.processor([p])["input_ids"].shape[1] for p in _messages(expected[0]))
    assert prefill[0] == first and prefill[1] <= second - first


def test_a_different_image_is_encoded_and_not_reused(pair):
    cached, plain = pair
    cached.clear_caches()
    q = "<image>What is it?"
    assert cached.generate(q, images=[A], max_new_tokens=5) == plain.generate(q, images=[A], max_new_tokens=5)
    assert cached.generate(q, images=[B], max_new_tokens=5) == plain.generate(q, images=[B], max_new_tokens=5)
    misses = cached.image_cache.misses
    assert misses >= 2 and len(cached.prefix_cache) == 2
    # a batch takes both images' features from the cache and still gives the uncached answers
    assert cached.generate_batch([q, q], images=[[A], [B]], max_new_tokens=5) == plain.generate_batch(
        [q, q], images=[[A], [B]], max_new_tokens=5)
    assert cached.image_cache.misses == misses
