"""Gemma 3 (Gemma3ForConditionalGeneration): checkpoint, processor, logits, cache and generation parity with
transformers on a tiny random checkpoint (3 decoder layers: local, global, local with a 6-token window)."""

from __future__ import annotations

import pytest
import torch
from PIL import ImageOps

import vlmkit
from gemma_fixtures import build_checkpoint, load_hf
from hf_fixtures import assert_eval_runs, sample_images
from test_models import report
from vlmkit.checkpoints.hf import load_model, save_model
from vlmkit.models.kv_cache import KVCache
from vlmkit.processing.processor import Processor

PROMPT = "<start_of_turn>user\nLook <start_of_image> and <start_of_image> what is shown?<end_of_turn>\n" \
         "<start_of_turn>model\n"
KEYS = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = build_checkpoint("gemma3", str(tmp_path_factory.mktemp("gemma3")))
    hf_model, processor = load_hf(folder)
    return folder, hf_model, processor


def hf_batch(processor, prompts, images, **kwargs):
    out = processor(text=prompts, images=images, return_tensors="pt", padding=True, **kwargs)
    return {k: out[k] for k in KEYS if k in out}


def test_processor_equals_transformers(setup):
    folder, _, processor = setup
    ours = Processor.from_folder(folder)
    a, b = sample_images()
    prompts = [PROMPT, "Only <start_of_image> here, and a longer question about it please"]
    expected = hf_batch(processor, prompts, [[a, b], [b]])
    got = ours(prompts, images=[[a, b], [b]])
    assert set(got) == set(expected)
    for k in KEYS:
        assert torch.equal(got[k], expected[k]), k
    assert expected["attention_mask"][:, 0].min() == 0  # left padding exercised


def test_pan_and_scan_equals_transformers(tmp_path):
    folder = build_checkpoint("gemma3", str(tmp_path), pan_and_scan=True)
    _, processor = load_hf(folder)
    ours = Processor.from_folder(folder)
    # transformers' Gemma3Processor's own defaults (off, 256, 4, 1.2) win over the folder's: enabled there per
    # call, here by the folder's preprocessor settings
    a, b = sample_images()
    wide = a.resize((97, 31))
    expected = hf_batch(processor, [PROMPT], [[wide, b]], do_pan_and_scan=True, pan_and_scan_min_crop_size=8,
                        pan_and_scan_max_num_crops=3, pan_and_scan_min_ratio_to_activate=1.2)
    got = ours([PROMPT], images=[[wide, b]])
    assert expected["pixel_values"].shape[0] > 2  # crops were made
    for k in KEYS:
        assert torch.equal(got[k], expected[k]), k


def test_chat_template_equals_transformers(setup):
    folder, _, processor = setup
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                {"role": "user", "content": [{"type": "text", "text": "Colour?"}]}]
    expected = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert Processor.from_folder(folder).apply_chat_template(messages) == expected
    # a folder without a template gets google/gemma-3-*-it's, which renders the same turns
    from vlmkit.processing.formats import format_for
    ours = Processor.from_folder(folder)
    assert ours.tokenizer.render_chat(messages, add_generation_prompt=True,
                                      chat_template=format_for("gemma3").template) == expected


def test_logits_match_with_two_images_and_the_image_matters(setup):
    folder, hf_model, processor = setup
    a, b = sample_images()
    batch = hf_batch(processor, [PROMPT], [[a, b]])
    ours = load_model(folder)
    with torch.no_grad():
        expected, got = hf_model(**batch).logits, ours(**batch).logits
        inverted = ours(**hf_batch(processor, [PROMPT], [[ImageOps.invert(a), b]])).logits
    diff = (expected - got).abs().max().item()
    report(f"gemma3: max |logit diff| {diff:.2e}, {batch['input_ids'].shape[1]} prompt tokens, 2 images")
    assert diff < 1e-4
    assert (inverted - got).abs().max().item() > 1e-3


def test_kv_cache_and_batch(setup):
    folder, _, processor = setup
    a, b = sample_images()
    batch = hf_batch(processor, [PROMPT], [[a, b]])
    model = load_model(folder)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    split = ids.shape[1] - 5
    with torch.no_grad():
        full = model(**batch).logits
        cache = KVCache()
        steps = [model(ids[:, :split], attention_mask=mask[:, :split], pixel_values=batch["pixel_values"],
                       cache=cache).logits]
        for t in range(split, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        two = hf_batch(processor, [PROMPT, "Only <start_of_image> here, a longer question please ok"], [[a, b], [b]])
        together = model(**two).logits
        alone = model(**hf_batch(processor, ["Only <start_of_image> here, a longer question please ok"], [[b]])).logits
        assert torch.allclose(together[1, -alone.shape[1]:], alone[0], atol=1e-4)


def test_greedy_text_long_decode_batch_and_stream(setup):
    folder, hf_model, processor = setup
    m = vlmkit.load(folder)
    a, b = sample_images()
    prompts = [PROMPT, "Only <start_of_image> here, and a longer question about it please"]
    images = [[a, b], [b]]
    batch = hf_batch(processor, prompts, images)
    with torch.no_grad():  # 20 new tokens: far past the 6-token window of the local layers
        out = hf_model.generate(**batch, max_new_tokens=20, do_sample=False)
    new = out[:, batch["input_ids"].shape[1]:]
    assert int((new != processor.tokenizer.pad_token_id).sum(-1).min()) > 12
    expected = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    got = m.generate_batch(prompts, images=images, max_new_tokens=20, raw=True)
    report(f"gemma3: greedy text of 20 tokens x 2 rows equal: {got == expected}")
    assert got == expected
    assert m.generate(prompts[0], images=images[0], max_new_tokens=20, raw=True) == expected[0]
    assert "".join(m.generate(prompts[0], images=images[0], max_new_tokens=20, raw=True,
                              stream=True)) == expected[0]
    assert "gemma3" in str(m.info())


def test_save_round_trip_loads_in_transformers(setup, tmp_path):
    folder, hf_model, processor = setup
    model = load_model(folder)
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    batch = hf_batch(processor, [PROMPT], [sample_images()])
    reloaded = type(hf_model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, again(**batch).logits, atol=1e-4)


def test_quantized_and_served(setup):
    folder, _, _ = setup
    import base64
    import io

    from fastapi.testclient import TestClient

    from vlmkit.serve import create_app
    a, _ = sample_images()
    for mode in ("int8", "int4"):
        assert isinstance(vlmkit.load(folder, quantize=mode).generate("Hi <start_of_image> what?", images=[a],
                                                                       max_new_tokens=3, raw=True), str)
    m = vlmkit.load(folder)
    buf = io.BytesIO()
    a.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": "What is shown?"}]}]
    expected = m.chat([{"role": "user", "content": [{"type": "image", "image": a},
                                                     {"type": "text", "text": "What is shown?"}]}], max_new_tokens=6)
    with TestClient(create_app(m)) as client:
        r = client.post("/v1/chat/completions", json={"model": "vlmkit", "max_tokens": 6, "messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected


# config.json of google/gemma-3-4b-it and google/paligemma2-3b-pt-224 as published: fields at their defaults omitted
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}
PALIGEMMA2_3B = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
    "projection_dim": 2304,
    "text_config": {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
                    "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
                    "num_image_tokens": 256, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                      "patch_size": 14, "projection_dim": 2304, "projector_hidden_act": "gelu_fast",
                      "vision_use_head": False},
}


@pytest.mark.parametrize("published", [GEMMA3_4B, PALIGEMMA2_3B], ids=["gemma-3-4b-it", "paligemma2-3b"])
def test_published_configs_read_as_transformers_reads_them(published):
    import transformers as tf

    from vlmkit.checkpoints.families import family_for_architecture
    ref = tf.AutoConfig.for_model(**published)
    t, v = ref.text_config, ref.vision_config
    cfg = family_for_architecture(published).from_hf(published)
    c = cfg.text
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim)
    assert c.layer_types == t.layer_types and c.sliding_window == t.sliding_window
    assert c.attn_scale == t.query_pre_attn_scalar**-0.5 and c.tie_word_embeddings
    assert c.attn_softcap == getattr(t, "attn_logit_softcapping", None)
    assert c.final_softcap == getattr(t, "final_logit_softcapping", None)
    full = t.rope_parameters.get("full_attention", t.rope_parameters)
    assert c.rope_theta == full["rope_theta"] and c.rope_factor == full.get("factor", 1.0)
    if "sliding_attention" in t.rope_parameters:
        assert c.rope_local_theta == t.rope_parameters["sliding_attention"]["rope_theta"]
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.hidden_size) == (
        v.image_size, v.patch_size, v.hidden_size)
    assert cfg.tokens_per_image == 256 and cfg.image_token_id == published["image_token_index"]


def test_eval_runs(setup, tmp_path, capsys):
    assert_eval_runs(setup[0], tmp_path, capsys)
