"""Greedy text through the public API equals transformers' generate + decode(skip_special_tokens=True)."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from hf_fixtures import FAMILIES, hf_inputs, load_hf, sample_images, sample_prompt

NEW_TOKENS = 8


def hf_greedy(hf_model, processor, batch) -> list[str]:
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[:, batch["input_ids"].shape[1]:]
    return processor.tokenizer.batch_decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, hf_checkpoint_dir):
    folder = hf_checkpoint_dir(request.param)
    hf_model, processor = load_hf(folder)
    processor.tokenizer.padding_side = "left"
    return request.param, vlmkit.load(folder), hf_model, processor


def test_greedy_text_with_two_images(pair):
    family, m, hf_model, processor = pair
    images = sample_images()
    prompt = sample_prompt(family, 2, images=images)
    expected = hf_greedy(hf_model, processor, hf_inputs(family, processor, images, prompt))[0]
    got = m.generate(prompt, images=None if family == "idefics" else images, max_new_tokens=NEW_TOKENS, raw=True)
    assert got == expected


def test_greedy_text_batch_of_two(pair):
    family, m, hf_model, processor = pair
    a, b = sample_images()
    prompts = [sample_prompt(family, 2, images=[a, b]), sample_prompt(family, 1, images=[b])]
    image_lists = [[a, b], [b]]
    if family == "idefics":
        batch = processor(text=prompts, return_tensors="pt", padding=True)
        got = m.generate_batch(prompts, max_new_tokens=NEW_TOKENS, raw=True)
    else:
        batch = processor(text=prompts, images=image_lists, return_tensors="pt", padding=True)
        got = m.generate_batch(prompts, images=image_lists, max_new_tokens=NEW_TOKENS, raw=True)
    expected = hf_greedy(hf_model, processor, batch)
    # transformers also penalises nothing here (greedy), so padded rows must agree too
    assert got == expected
    alone = [m.generate(p, images=None if family == "idefics" else im, max_new_tokens=NEW_TOKENS, raw=True)
             for p, im in zip(prompts, image_lists)]
    assert got == alone


def test_chat_messages_equal_string_prompt(pair):
    family, m, _, _ = pair
    if family == "idefics":
        pytest.skip("IDEFICS has no chat template in its checkpoint")
    images = sample_images()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "What is shown?"}]}]
    assert m.chat(messages, images=images, max_new_tokens=NEW_TOKENS) == m.generate(
        sample_prompt(family, 2), images=images, max_new_tokens=NEW_TOKENS, raw=True)
