"""processing/formats/: one family's batch is the same whichever way it is built (processor batch, the server's
merge of single-prompt outputs), the lookup, and the model's padding-image rule."""

import pytest
import torch

from hf_fixtures import sample_images, sample_messages

from vlmkit.config import VLMConfig
from vlmkit.models.vlm import flat_images
from vlmkit.processing.batching import CollateError
from vlmkit.processing.formats import FORMATS, format_for
from vlmkit.processing.processor import Processor


def assert_identical(a: dict, b: dict):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def test_processor_batch_equals_merged_single_prompts(hf_checkpoint):
    family, path = hf_checkpoint
    proc = Processor.from_folder(path)
    a, b = sample_images()
    prompts = [sample_messages(2), [{"role": "user", "content": "No image here"}], sample_messages(1)]
    images = [[a, b], [], [b]]
    together = proc(prompts, images=images)
    merged = proc.format.merge([proc(p, i) for p, i in zip(prompts, images)], proc.pad_token_id)
    assert_identical(together, merged)
    text_only = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hello there"}]]
    assert_identical(proc(text_only), proc.format.merge([proc(p) for p in text_only], proc.pad_token_id))


def test_merge_refuses_what_cannot_share_a_batch():
    fmt = format_for("llava")
    one = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
           "pixel_values": torch.zeros(1, 3, 4, 4)}
    other = dict(one, pixel_values=torch.zeros(1, 3, 6, 6))
    with pytest.raises(CollateError):
        fmt.merge([one, other], 0)
    with pytest.raises(CollateError, match="keys"):
        fmt.merge([one, dict(one, extra=torch.zeros(1))], 0)
    assert fmt.merge([one], 0)["input_ids"] is one["input_ids"]


def test_format_for_names_and_configs():
    assert set(FORMATS) == {"llava", "llava_next", "idefics", "idefics2", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl",
                            "gemma3", "paligemma", "mllama"}
    cfg = VLMConfig(family="idefics2")
    assert format_for(cfg) is format_for("idefics2")
    cfg.extra["hf_architecture"] = "smolvlm"
    assert format_for(cfg).name == "smolvlm" and format_for(cfg).read_rules({}, {}).family == "idefics3"
    with pytest.raises(ValueError, match="unknown family"):
        format_for("blip")


def test_flat_images_drops_all_zero_padding_slots():
    pixels = torch.zeros(2, 3, 3, 4, 4)
    pixels[0, 0] = 1
    pixels[0, 1, 0, 0, 0] = -0.5
    pixels[1, 0] = 2
    mask = (pixels[:, :, 0] != 0).long()
    flat, flat_mask = flat_images(pixels, mask)
    assert flat.shape == (3, 3, 4, 4) and torch.equal(flat[2], pixels[1, 0])
    assert torch.equal(flat_mask, mask.reshape(6, 4, 4)[[0, 1, 3]])
    assert flat_images(pixels, mask, keep_padding=True)[0].shape == (6, 3, 4, 4)
    llava = torch.ones(2, 3, 4, 4)
    assert flat_images(llava)[0] is llava and flat_images(llava)[1] is None
