"""Training batches per family: exact label masks (answers only, LLaVA plain captions, open_flamingo interleaved
documents), prompt ids equal to the processor's, padding / image keys, packing and the data order."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from hf_fixtures import FAMILIES, sample_images
from vlmkit.data.collate import BatchPlan, Collator
from vlmkit.data.readers import DataError, Example
from vlmkit.processing.processor import Processor

CHAT = Example("chat", turns=[("user", "<image>\nWhat is it?"), ("assistant", "A red dot."),
                              ("user", "Sure?"), ("assistant", "Yes")])
DOC = Example("interleaved", pieces=["Intro text.", None, "A dot.", "More.", None, " Second."])
STOP = {"llava": "<|im_end|>"}  # the LLaVA template writes no stop token: the EOS is appended to each answer


@pytest.fixture(scope="module")
def processors(hf_checkpoint_dir):
    return {f: Processor.from_folder(hf_checkpoint_dir(f)) for f in FAMILIES}


def label_runs(row, tok) -> list[str]:
    """Decoded text of each contiguous run of labeled tokens; also checks a label is its own input id."""
    runs, current = [], []
    for i, (tid, lab) in enumerate(zip(row.input_ids, row.labels)):
        if lab != -100:
            assert lab == tid, f"label at {i} is not the input id"
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def with_images(example, images):
    return Example(example.kind, images=list(images), turns=example.turns, caption=example.caption,
                   pieces=example.pieces)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_labels_cover_each_answer_and_its_stop_token_only(processors, family):
    proc = processors[family]
    a, _ = sample_images()
    row = Collator(proc).encode(with_images(CHAT, [a]))
    stop = STOP.get(family, "<end_of_utterance>")
    assert label_runs(row, proc.tokenizer) == [f" A red dot.{stop}", f" Yes{stop}"]
    # Everything else is exactly the processor's prompt: same ids for the same conversation text.
    messages = [{"role": r, "content": [{"type": "image"}] * t.count("<image>") +
                 [{"type": "text", "text": t.replace("<image>", "").strip()}]} for r, t in CHAT.turns]
    text = proc.apply_chat_template(messages, add_generation_prompt=False)
    if family == "llava":
        text = text.replace("A red dot. ", f"A red dot.{stop} ").replace("Yes ", f"Yes{stop} ")
    expected = proc(messages if family != "llava" else text, [a], add_generation_prompt=False)["input_ids"][0]
    assert row.input_ids == expected.tolist()


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_plain_template_labels_exactly_the_caption(processors, family):
    """LLaVA stage 1: `<image>` + caption + "\\n"; only the caption and the newline carry a loss."""
    proc = processors[family]
    a, b = sample_images()
    row = Collator(proc, template="plain").encode(Example("caption", images=[a, b], caption="two shapes"))
    reference = proc("<image><image>two shapes\n", [a, b])["input_ids"][0].tolist()
    assert row.input_ids == reference
    n = len(proc.tokenizer.encode("two shapes\n", add_special_tokens=False))
    assert row.labels == [-100] * (len(reference) - n) + reference[-n:]
    # a chat example in the plain template: its images and first answer
    chat_row = Collator(proc, template="plain").encode(with_images(CHAT, [a]))
    assert label_runs(chat_row, proc.tokenizer) == ["A red dot.\n"]


@pytest.mark.parametrize("family,lead", [("llava", ""), ("idefics", ""), ("idefics2", " "), ("idefics3", "")])
def test_interleaved_labels_follow_open_flamingo(processors, family, lead):
    """Text after an image through the end-of-chunk token (EOS) carries the loss; the text before the first image
    and the image tokens do not."""
    proc = processors[family]
    a, b = sample_images()
    row = Collator(proc).encode(with_images(DOC, [a, b]))
    eos = proc.tokenizer.special_tokens["eos_token"]
    second = "Second." if family == "idefics" else " Second."  # IDEFICS strips spaces around each text piece
    assert label_runs(row, proc.tokenizer) == [f"{lead}A dot.\n\nMore.{eos}", f"{second}{eos}"]
    image_id = proc.image_token_id
    assert all(lab == -100 for tid, lab in zip(row.input_ids, row.labels) if tid == image_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_is_left_padded_with_the_family_image_keys_and_trains(hf_checkpoint_dir, family):
    m = vlmkit.load(hf_checkpoint_dir(family))
    a, b = sample_images()
    collator = Collator(m.processor)
    examples = [with_images(CHAT, [a]), Example("caption", images=[b], caption="A shape."),
                Example("chat", turns=[("user", "Hi"), ("assistant", "Hello")])]
    batch = collator(examples)
    rows = [collator.encode(ex) for ex in examples]
    width = max(len(r.input_ids) for r in rows)
    for i, r in enumerate(rows):
        pad = width - len(r.input_ids)
        assert batch["input_ids"][i, pad:].tolist() == r.input_ids
        assert batch["labels"][i, pad:].tolist() == r.labels and (batch["labels"][i, :pad] == -100).all()
        assert batch["attention_mask"][i].tolist() == [0] * pad + [1] * len(r.input_ids)
    keys = {"llava": {"pixel_values"}, "idefics": {"pixel_values", "image_attention_mask"}}
    assert set(batch) - {"input_ids", "attention_mask", "labels"} == keys.get(
        family, {"pixel_values", "pixel_attention_mask"})
    out = m.model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("family", ["llava", "idefics"])
def test_packing_restarts_positions_and_keeps_images_per_example(processors, family):
    proc = processors[family]
    a, b = sample_images()
    examples = [with_images(CHAT, [a]), Example("caption", images=[b], caption="A shape.")]
    rows = [Collator(proc).encode(ex) for ex in examples]
    n0, n1 = len(rows[0].input_ids), len(rows[1].input_ids)
    batch = Collator(proc, pack_length=n0 + n1).collate(rows)
    assert batch["input_ids"].shape == (1, n0 + n1)
    assert batch["input_ids"][0].tolist() == rows[0].input_ids + rows[1].input_ids
    assert batch["labels"][0].tolist() == rows[0].labels + rows[1].labels
    assert batch["position_ids"][0].tolist() == list(range(n0)) + list(range(n1))
    if family == "idefics":  # block-diagonal: each example's tokens see only its own image
        mask = batch["image_attention_mask"][0]
        assert mask.shape == (n0 + n1, 2)
        assert torch.equal(mask[:n0, 0], rows[0].image_mask[:, 0]) and not mask[:n0, 1].any()
        assert torch.equal(mask[n0:, 1], rows[1].image_mask[:, 0]) and not mask[n0:, 0].any()
    # a pack limit below the pair keeps them apart
    assert Collator(proc, pack_length=n0 + n1 - 1).collate(rows)["input_ids"].shape[0] == 2


def test_bad_examples_raise_data_error(processors):
    proc = processors["llava"]
    with pytest.raises(DataError, match="1 image placeholders but the example has 0 images"):
        Collator(proc).encode(Example("chat", turns=[("user", "<image>Q"), ("assistant", "A")]))
    with pytest.raises(DataError, match="bad image"):
        Collator(proc).encode(Example("caption", images=[b"not an image"], caption="x"))
    with pytest.raises(DataError, match="> max_length=5"):
        Collator(proc, max_length=5).encode(Example("chat", turns=[("user", "Q " * 9), ("assistant", "A")]))


def test_batch_plan_is_a_pure_function_of_seed_and_step():
    plan = BatchPlan(10, 4, seed=3)
    assert plan.steps_per_epoch == 2
    epoch0 = plan.indices(0) + plan.indices(1)
    assert len(set(epoch0)) == 8  # no repeats within an epoch; the 2 left over are dropped
    assert BatchPlan(10, 4, seed=3).indices(5) == plan.indices(5)  # a fresh plan (a resumed run) agrees
    assert plan.indices(2) != plan.indices(0) and BatchPlan(10, 4, seed=4).indices(0) != plan.indices(0)
    lengths = [5, 50, 7, 42, 9, 33, 1, 60, 2, 20]
    grouped = BatchPlan(10, 2, seed=0, lengths=lengths, group_size=5)
    order = grouped.epoch_order(0)
    assert sorted(order) == list(range(10))
    assert [lengths[i] for i in order] == sorted((lengths[i] for i in order), key=lambda n: -n)  # one mega-batch
