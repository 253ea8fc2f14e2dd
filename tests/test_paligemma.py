"""PaliGemma 1 (Gemma decoder) and PaliGemma 2 (Gemma 2: soft-capping, sliding layers, sandwich norms): checkpoint,
processor (prefix BOS + "\\n", token_type_ids), prefix-LM logits, cache and greedy-text parity with transformers."""

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

KEYS = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")
PROMPTS = ["<image><image>caption en", "<image>answer en what colour is the big shape on the left?"]


@pytest.fixture(scope="module", params=["paligemma", "paligemma2"])
def setup(request, tmp_path_factory):
    folder = build_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))
    hf_model, processor = load_hf(folder)
    return request.param, folder, hf_model, processor


def hf_batch(processor, prompts, images):
    out = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    return {k: out[k] for k in KEYS}


def test_processor_equals_transformers(setup):
    _, folder, _, processor = setup
    a, b = sample_images()
    expected = hf_batch(processor, PROMPTS, [[a, b], [b]])
    got = Processor.from_folder(folder)(PROMPTS, images=[[a, b], [b]])
    assert set(got) == set(expected)
    for k in KEYS:
        assert torch.equal(got[k], expected[k]), k
    assert expected["attention_mask"][:, 0].min() == 0


def test_logits_match_and_the_image_matters(setup):
    family, folder, hf_model, processor = setup
    a, b = sample_images()
    batch = hf_batch(processor, PROMPTS[:1], [[a, b]])
    ours = load_model(folder)
    with torch.no_grad():
        expected, got = hf_model(**batch).logits, ours(**batch).logits
        inverted = ours(**hf_batch(processor, PROMPTS[:1], [[ImageOps.invert(a), b]])).logits
    diff = (expected - got).abs().max().item()
    report(f"{family}: max |logit diff| {diff:.2e}, {batch['input_ids'].shape[1]} prompt tokens, 2 images")
    assert diff < 1e-4
    assert (inverted - got).abs().max().item() > 1e-3


def test_prefix_is_bidirectional_and_cache_continues_it(setup):
    _, folder, _, processor = setup
    a, b = sample_images()
    batch = hf_batch(processor, PROMPTS[:1], [[a, b]])
    model = load_model(folder)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        prefix = model(**batch).logits
        # the first prompt token sees the last one: changing the last changes the first's logits
        changed = dict(batch, input_ids=torch.cat([ids[:, :-1], ids[:, -2:-1]], 1))
        assert (model(**changed).logits[:, 0] - prefix[:, 0]).abs().max() > 1e-4
        cache = KVCache()
        model(**batch, cache=cache)
        nxt = prefix[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=cache).logits
        full = torch.cat([ids, nxt], 1)
        whole = model(full, attention_mask=torch.cat([mask, mask[:, :1]], 1), pixel_values=batch["pixel_values"],
                      token_type_ids=torch.cat([batch["token_type_ids"], torch.ones_like(nxt)], 1)).logits
        assert torch.allclose(step[:, -1], whole[:, -1], atol=1e-5)


def test_greedy_text_batch_and_stream(setup):
    family, folder, hf_model, processor = setup
    m = vlmkit.load(folder)
    a, b = sample_images()
    images = [[a, b], [b]]
    batch = hf_batch(processor, PROMPTS, images)
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=12, do_sample=False)
    expected = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    got = m.generate_batch(PROMPTS, images=images, max_new_tokens=12, raw=True)
    report(f"{family}: greedy text of 12 tokens x 2 rows equal: {got == expected}")
    assert got == expected
    assert m.generate(PROMPTS[1], images=images[1], max_new_tokens=12, raw=True) == expected[1]
    assert "".join(m.generate(PROMPTS[1], images=images[1], max_new_tokens=12, raw=True, stream=True)) == expected[1]
    # chat messages render to the plain prompt (PaliGemma has no chat template; the default concatenates)
    text = PROMPTS[1].removeprefix("<image>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    assert m.chat(messages, images=images[1], max_new_tokens=12) == expected[1]


def test_save_round_trip_loads_in_transformers(setup, tmp_path):
    _, folder, hf_model, processor = setup
    model = load_model(folder)
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    batch = hf_batch(processor, PROMPTS[:1], [sample_images()])
    reloaded = type(hf_model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, again(**batch).logits, atol=1e-4)


def test_training_rows_equal_the_processors_suffix_rule(setup):
    """A chat example's training row: the prompt as prefix, the answer + EOS as suffix (token_type_ids 1, labels),
    as PaliGemmaProcessor(text, images, suffix=...) builds it; the loss then trains only the answer."""
    from vlmkit.data.collate import Collator
    from vlmkit.data.readers import Example

    family, folder, hf_model, processor = setup
    a, _ = sample_images()
    expected = processor(text=["<image>answer en what is it?"], images=[[a]], suffix=["a red circle"],
                         return_tensors="pt")
    ex = Example("chat", images=[a], turns=[("user", "<image>answer en what is it?"), ("assistant", "a red circle")])
    batch = Collator(Processor.from_folder(folder))([ex])
    n = int(expected["input_ids"].shape[1])
    for k in ("input_ids", "token_type_ids", "labels"):  # ours ends with the prompt's own "\n" after the EOS
        assert torch.equal(batch[k][:, :n], expected[k]), k
    model = load_model(folder)
    with torch.no_grad():
        ref = hf_model(**{k: expected[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                   "token_type_ids", "labels")}).loss
        ours = model(**{k: v[:, :n] if v.dim() == 2 else v for k, v in batch.items()}).loss
    assert abs(ref.item() - ours.item()) < 1e-4


def test_lora_training_run(setup, tmp_path):
    family, folder, _, _ = setup
    if family != "paligemma2":
        pytest.skip("one run is enough: both decoders train through the same path")
    import json
    from pathlib import Path

    from vlmkit import cli
    images = Path(__file__).parent / "data" / "train" / "images"
    rows = [{"image": str(images / f"{c}_circle.png"), "caption": f"A {c} circle."} for c in ("red", "blue")]
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert cli.main(["train", "--model", folder, "--data", str(data), "--batch-size", "2", "--steps", "1",
                     "--out", str(out)]) == 0
    m = vlmkit.load(out / "final")
    assert isinstance(m.generate("<image>caption en", images=[str(images / "red_circle.png")], max_new_tokens=2), str)


def test_packing_is_refused(setup):
    from vlmkit.data.collate import Collator
    with pytest.raises(ValueError, match="cannot be packed"):
        Collator(Processor.from_folder(setup[1]), pack_length=64)


def test_eval_runs(setup, tmp_path, capsys):
    assert_eval_runs(setup[1], tmp_path, capsys)
