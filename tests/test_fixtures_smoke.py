"""The reference checkpoints themselves: they save, reload in transformers, run and generate."""

import os

import pytest
import torch

from hf_fixtures import hf_inputs, load_hf, sample_images, sample_messages, sample_prompt

# <image> placeholders per prompt of two images: LLaVA one per patch (3x3), IDEFICS one per image,
# Idefics2 the perceiver latents (4), Idefics3/SmolVLM 4 per tile with 1x2 + 2x2 tiles and two globals.
IMAGE_TOKENS = {"llava": 18, "idefics": 2, "idefics2": 8, "idefics3": 32, "smolvlm": 32}


def test_checkpoint_forward_and_generate(hf_checkpoint):
    family, path = hf_checkpoint
    files = os.listdir(path)
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)

    model, processor = load_hf(path)
    images = sample_images()
    assert {im.mode for im in images} == {"RGB", "RGBA"} and images[0].size != images[1].size
    prompt = sample_prompt(family)
    batch = hf_inputs(family, processor, images, prompt)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == IMAGE_TOKENS[family]
    if family != "idefics":
        assert processor.apply_chat_template(sample_messages(), add_generation_prompt=True) == prompt

    with torch.no_grad():
        logits = model(**batch).logits
        flipped = model(**{**batch, "pixel_values": batch["pixel_values"].flip(-1)}).logits
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
        again = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == len(processor.tokenizer)
    assert torch.isfinite(logits).all()
    # The non-trivial init (open IDEFICS gates, distinct latents...) makes the answer depend on the images.
    assert (logits[0, -1] - flipped[0, -1]).abs().max() > 1e-3
    new = out[0, batch["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 5 and torch.equal(out, again)
    params = sum(p.numel() for p in model.parameters())
    print(f"{family}: {params:,} parameters, generated {new.tolist()} -> "
          f"{processor.decode(new, skip_special_tokens=True)!r}")


@pytest.mark.parametrize("hf_checkpoint", ["idefics"], indirect=True)
def test_idefics_decoupled_vocab(hf_checkpoint):
    model, processor = load_hf(hf_checkpoint.path)
    cfg, tok = model.config, processor.tokenizer
    # Like idefics-9b: the added tokens sit right after the base vocabulary, in the extra table.
    ids = tok.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"])
    assert ids == list(range(cfg.vocab_size, cfg.vocab_size + cfg.additional_vocab_size))
    assert model.lm_head.additional_fc.weight.shape[0] == cfg.additional_vocab_size == 3
