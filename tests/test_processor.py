"""The prompt side of vlmkit's Processor against transformers' processors, for every family.

Reference: the tiny checkpoints of tests/hf_fixtures.py, loaded back with transformers (their real processors:
LlavaProcessor, IdeficsProcessor, Idefics2Processor, Idefics3Processor, SmolVLMProcessor). input_ids and
attention_mask must be equal, pixel values within 1e-5, masks equal.
"""

import base64
import functools
import io

import pytest
import torch

from hf_fixtures import QUESTION, build_processor, hf_inputs, load_hf, sample_images, sample_messages, sample_prompt

from vlmkit.processing.images import ImageError
from vlmkit.processing.processor import Processor, PromptError
from vlmkit.processing.formats import idefics_image_attention_mask

TOL = 1e-5


@functools.lru_cache(maxsize=None)
def _reference(path):
    return load_hf(path)


def reference(path):
    """transformers' processor as loaded back from the folder (fresh padding side each time)."""
    model, proc = _reference(path)
    proc.tokenizer.padding_side = "right"
    return proc


@functools.lru_cache(maxsize=None)
def ours(path):
    return Processor.from_folder(path)


def assert_same(ref, got, keys=None):
    keys = keys or list(ref.keys())
    for key in keys:
        assert key in got, f"missing {key}"
        a, b = torch.as_tensor(ref[key]), got[key]
        assert tuple(a.shape) == tuple(b.shape), (key, tuple(a.shape), tuple(b.shape))
        if a.is_floating_point():
            assert (a - b).abs().max().item() <= TOL, key
        else:
            assert torch.equal(a.long(), b.long()), key


def unpadded(batch):
    """Rows without padding (either side)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def as_idefics_items(prompt, images):
    it = iter(images)
    return [next(it) if x == "<image>" else x for x in prompt]


# ------------------------------------------------------------------------------------------------ parity

def test_string_prompt_two_images(hf_checkpoint):
    family, path = hf_checkpoint
    images = sample_images()  # 64x32 RGB and 23x37 RGBA
    ref = hf_inputs(family, reference(path), images, sample_prompt(family))
    if family == "idefics":  # the same prompt as an interleaved list and as a string with placeholders
        got = ours(path)(as_idefics_items(sample_prompt(family), images))
        assert_same(ref, got)
        got = ours(path)("User:<image><image>" + QUESTION + "<end_of_utterance>\nAssistant:", images)
    else:
        got = ours(path)(sample_prompt(family), images)
    assert_same(ref, got)
    assert set(got) == set(ref.keys())


def test_chat_messages_two_images(hf_checkpoint):
    family, path = hf_checkpoint
    images, proc, messages = sample_images(), ours(path), sample_messages(2)
    if family == "idefics":  # no chat template: the documented default, equal to the interleaved form
        assert proc.apply_chat_template(messages) == "User:<image><image>" + QUESTION + "<end_of_utterance>\nAssistant:"
        ref = hf_inputs(family, reference(path), images, sample_prompt(family))
        assert_same(ref, proc(messages, images))
        return
    ref_proc = reference(path)
    text = ref_proc.apply_chat_template(messages, add_generation_prompt=True)
    assert proc.apply_chat_template(messages, add_generation_prompt=True) == text
    assert proc.apply_chat_template(messages, add_generation_prompt=False) == \
        ref_proc.apply_chat_template(messages, add_generation_prompt=False)
    assert_same(ref_proc(text=text, images=images, return_tensors="pt"), proc(messages, images))
    # Images inline in the messages, tokenized by transformers' apply_chat_template.
    inline = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                                           {"type": "text", "text": QUESTION}]}]
    ref = ref_proc.apply_chat_template(inline, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
    assert_same(ref, proc(inline))


def test_left_padded_batch(hf_checkpoint):
    family, path = hf_checkpoint
    images, proc, ref_proc = sample_images(), ours(path), reference(path)
    short = sample_prompt(family, 1, images=images[1:] if family == "idefics" else None)
    long_ = sample_prompt(family, 2, images=images if family == "idefics" else None)
    per_prompt = [[images[1]], images]
    got = proc([short, long_]) if family == "idefics" else proc([short, long_], per_prompt)
    rows = unpadded(got)
    assert len(rows[0]) < len(rows[1]) == got["input_ids"].shape[1]
    assert got["attention_mask"][0, 0] == 0 and got["attention_mask"][0, -1] == 1  # padding on the left
    assert (got["input_ids"][0, : got["input_ids"].shape[1] - len(rows[0])] == proc.pad_token_id).all()

    singles = []
    for prompt, imgs in zip([short, long_], per_prompt):
        if family == "idefics":
            singles.append(ref_proc(text=prompt, return_tensors="pt"))
        else:
            singles.append(ref_proc(text=prompt, images=imgs, return_tensors="pt"))
    assert rows == [unpadded(s)[0] for s in singles]  # transformers' padding side may differ: compare content
    for b, single in enumerate(singles):
        n = len(per_prompt[b])
        if family == "llava":
            start = sum(len(x) for x in per_prompt[:b])
            assert (got["pixel_values"][start:start + n] - single["pixel_values"]).abs().max() <= TOL
            continue
        ref_pixels = single["pixel_values"][0]
        slots, h, w = ref_pixels.shape[0], ref_pixels.shape[-2], ref_pixels.shape[-1]
        assert (got["pixel_values"][b, :slots, :, :h, :w] - ref_pixels).abs().max() <= TOL
        assert got["pixel_values"][b, slots:].abs().sum() == 0
        if family == "idefics":
            t = len(rows[b])
            assert torch.equal(got["image_attention_mask"][b, -t:, :slots], single["image_attention_mask"][0])
            assert got["image_attention_mask"][b, :-t].sum() == 0  # padding sees no image
        else:
            assert torch.equal(got["pixel_attention_mask"][b, :slots, :h, :w], single["pixel_attention_mask"][0])
            assert got["pixel_attention_mask"][b, :slots].sum() == single["pixel_attention_mask"][0].sum()

    # And against transformers itself batching on the left: every tensor equal.
    ref_proc.tokenizer.padding_side = "left"
    ref = hf_inputs(family, ref_proc, [[], []] if family == "idefics" else per_prompt, [short, long_])
    assert_same(ref, got)


def test_text_only_prompts(hf_checkpoint):
    family, path = hf_checkpoint
    proc, ref_proc = ours(path), reference(path)
    if family == "idefics":
        ref = ref_proc(text=[["User: hello there<end_of_utterance>", "\nAssistant:"]], return_tensors="pt")
        got = proc("User: hello there<end_of_utterance>\nAssistant:")
        assert got["image_attention_mask"].dtype == torch.bool and got["pixel_values"].shape[1] == 1
    else:
        ref = ref_proc(text="Hello there, how are you?", return_tensors="pt")
        got = proc("Hello there, how are you?")
    assert_same(ref, got)
    assert set(got) == set(ref.keys())


def test_model_forward_matches_transformers_on_our_batch(hf_checkpoint):
    """The batch feeds vlmkit's model and transformers' alike (keys and layouts), with the same logits."""
    from vlmkit.checkpoints.hf import load_model

    family, path = hf_checkpoint
    images = sample_images()
    batch = ours(path)([sample_messages(1), sample_messages(2)], [[images[1]], images])
    hf_model, _ = _reference(path)
    with torch.no_grad():
        mine = load_model(path)(**batch).logits
        theirs = hf_model(**batch).logits
    real = batch["attention_mask"].bool()
    assert (mine[real] - theirs[real]).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------ family rules

def _saved_variant(tmp_path, family, **image_settings):
    ref = build_processor(family)
    for key, value in image_settings.items():
        setattr(ref.image_processor, key, value)
    ref.save_pretrained(tmp_path)  # a processor-only folder: vlmkit reads processor_class
    return ref, Processor.from_folder(tmp_path)


def test_idefics2_image_splitting(tmp_path):
    pytest.importorskip("transformers")
    ref, proc = _saved_variant(tmp_path, "idefics2", do_image_splitting=True)
    images = sample_images()
    prompt = "User:<image>Compare with<image>. And?<end_of_utterance>\nAssistant:"
    r, got = ref(text=prompt, images=images, return_tensors="pt"), proc(prompt, images)
    assert_same(r, got)
    image_id = proc.image_token_id
    assert int((got["input_ids"] == image_id).sum()) == 2 * 5 * proc.rules.image_seq_len


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_without_splitting(tmp_path, family):
    pytest.importorskip("transformers")
    ref, proc = _saved_variant(tmp_path, family, do_image_splitting=False)
    images = sample_images()
    prompt = sample_prompt(family)
    assert_same(ref(text=prompt, images=images, return_tensors="pt"), proc(prompt, images))
    text = proc.tokenizer.decode(proc(prompt, images)["input_ids"][0], skip_special_tokens=False)
    assert "<row_1_col_1>" not in text and text.count("<global-img>") == 2


@pytest.mark.parametrize("hf_checkpoint", ["idefics"], indirect=True)
def test_idefics_image_attention_mask_rules(hf_checkpoint):
    path = hf_checkpoint.path
    a, b = sample_images()
    eos = "<|im_end|>"
    prompt = ["Intro", "User:", a, "Describe." + eos, "User: more", b, "and", "\nAssistant:"]
    ref = reference(path)(text=prompt, return_tensors="pt")
    got = ours(path)(prompt)
    assert_same(ref, got)
    mask, ids = got["image_attention_mask"][0], got["input_ids"][0].tolist()
    first_image = ids.index(ours(path).image_token_id)
    eos_at = ids.index(ours(path).tokenizer.token_to_id(eos))
    assert mask[:first_image].sum() == 0  # before any image: none
    assert mask[first_image, 0] == 1 and mask[eos_at, 0] == 1  # the EOS still sees its image...
    assert mask[eos_at + 1].sum() == 0  # ...the tokens after it see none until the next image
    assert mask[-1].tolist() == [0, 1]  # the latest image only


@pytest.mark.parametrize("hf_checkpoint", ["idefics"], indirect=True)
def test_idefics_interleaving_options(hf_checkpoint):
    """Adjacent images share a fake token, empty items count as text, and IdeficsProcessor's call options
    add_end_of_utterance_token / add_eos_token (processor_config.json keys for vlmkit) behave the same."""
    a, b = sample_images()
    proc = Processor.from_folder(hf_checkpoint.path)
    prompt = ["User: hi", a, "text one", "text two", b, b, "", "\nAssistant:"]
    assert_same(reference(hf_checkpoint.path)(text=prompt, return_tensors="pt"), proc(prompt))
    proc.rules.add_end_of_utterance_token = proc.rules.add_eos_token = True
    ref = reference(hf_checkpoint.path)(text=prompt, add_end_of_utterance_token=True, add_eos_token=True,
                                        return_tensors="pt")
    assert_same(ref, proc(prompt))


def test_idefics_image_attention_mask_function():
    ids = torch.tensor([[0, 0, 5, 7, 1, 9, 2, 9, 7, 9], [5, 7, 9, 7, 9, 7, 9, 9, 9, 9]])  # image=7, eos=2
    mask = idefics_image_attention_mask(ids, image_token_id=7, eos_token_id=2, num_images=2)
    assert mask[0, :, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert mask[0, :, 1].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert mask[1].sum(-1).tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 0, 0]  # a third image is beyond num_images


def test_default_chat_templates(hf_checkpoint):
    """Without a chat template in the checkpoint, the documented per-family default is used."""
    family, path = hf_checkpoint
    proc = Processor.from_folder(path)
    proc.tokenizer.chat_template = None
    expected = {
        "llava": "USER: <image>\n<image>\nWhat is shown? ASSISTANT:",
        "idefics": "User:<image><image>What is shown?<end_of_utterance>\nAssistant:",
        "idefics2": "User:<image><image>What is shown?<end_of_utterance>\nAssistant:",
        "idefics3": "<|im_start|>User:<image><image>What is shown?<end_of_utterance>\nAssistant:",
        "smolvlm": "<|im_start|>User:<image><image>What is shown?<end_of_utterance>\nAssistant:",
    }[family]
    assert proc.apply_chat_template(sample_messages(2)) == expected
    images = sample_images()
    if family != "idefics":  # same ids as the string form (idefics is covered by test_chat_messages_two_images)
        from_chat = proc(sample_messages(2), images)["input_ids"]
        assert torch.equal(from_chat, proc(sample_prompt(family), images)["input_ids"])


# ------------------------------------------------------------------------------------------------ prompt forms

@pytest.mark.parametrize("hf_checkpoint", ["llava"], indirect=True)
def test_prompt_forms_agree(hf_checkpoint, tmp_path):
    proc = ours(hf_checkpoint.path)
    a, b = sample_images()
    png = io.BytesIO()
    b.save(png, format="PNG")
    path = tmp_path / "b.png"
    path.write_bytes(png.getvalue())
    b64 = base64.b64encode(png.getvalue()).decode()
    expected = proc("USER: <image>\nWhat? ASSISTANT:", [b])
    for form in (
        proc(["USER: ", b, "\nWhat? ASSISTANT:"]),                      # interleaved, PIL
        proc(["USER: ", png.getvalue(), "\nWhat? ASSISTANT:"]),         # interleaved, bytes
        proc(["USER: ", str(path), "\nWhat? ASSISTANT:"]),              # interleaved, an existing image path
        proc([{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "What?"}]}]),
        proc([{"role": "user", "content": "<image>\nWhat?"}], [b]),      # string content
        proc(["USER: ", "data:image/png;base64," + b64, "\nWhat? ASSISTANT:"]),  # interleaved, data: URI
        proc([{"role": "user", "content": [{"type": "image", "base64": b64}, {"type": "text", "text": "What?"}]}]),
        proc([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                           {"type": "text", "text": "What?"}]}]),
    ):
        assert_same(expected, form)
    # A batch with a flat image list is split by placeholder count, as transformers does.
    flat = proc(["USER: <image>\nWhat? ASSISTANT:", "USER: <image>\n<image>\nWhat? ASSISTANT:"], [b, a, b])
    nested = proc(["USER: <image>\nWhat? ASSISTANT:", "USER: <image>\n<image>\nWhat? ASSISTANT:"], [[b], [a, b]])
    assert_same(nested, flat)
    assert flat["pixel_values"].shape[0] == 3


@pytest.mark.parametrize("hf_checkpoint", ["idefics2"], indirect=True)
def test_multi_turn_chat(hf_checkpoint):
    path = hf_checkpoint.path
    a, b = sample_images()
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    ]
    ref_proc = reference(path)
    text = ref_proc.apply_chat_template(messages, add_generation_prompt=True)
    assert_same(ref_proc(text=text, images=[a, b], return_tensors="pt"), ours(path)(messages, [a, b]))


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("hf_checkpoint", ["llava", "idefics", "idefics3"], indirect=True)
def test_errors(hf_checkpoint):
    family, path = hf_checkpoint
    proc = ours(path)
    a, b = sample_images()
    with pytest.raises(PromptError, match=r"2 <image> placeholder\(s\) but 1 image"):
        proc("x <image> y <image>", [a])
    with pytest.raises(PromptError, match=r"prompt 1 has 1 <image> placeholder\(s\) but 2 image"):
        proc(["<image> a", "<image> b"], [[a], [a, b]])
    with pytest.raises(PromptError, match=r"no <image> placeholder but 1 image.*text-only"):
        proc("just text", [a])
    with pytest.raises(PromptError, match=r"2 <image> placeholders in all .* but 3 images"):
        proc(["<image> a", "<image> b"], [a, b, a])
    with pytest.raises(PromptError, match=r"images has 1 lists for 2 prompts"):
        proc(["<image> a", "<image> b"], [[a]])
    with pytest.raises(PromptError, match=r"is \d+ tokens .*longer than max_length=8"):
        proc("a fairly long prompt " * 5, max_length=8)
    with pytest.raises(PromptError, match=r"is \d+ tokens .*max_length=2048"):  # the model's context by default
        proc("word " * 3000)
    with pytest.raises(PromptError, match=r"unknown role 'robot'"):
        proc([{"role": "robot", "content": "hi"}])
    with pytest.raises(PromptError, match=r"unknown content type 'audio'"):
        proc([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}])
    with pytest.raises(PromptError, match=r"a text part needs a string 'text'"):
        proc([{"role": "user", "content": [{"type": "text"}]}])
    for empty in ("", "   ", [], [{"role": "user", "content": ""}]):
        with pytest.raises(PromptError, match="empty"):
            proc(empty)
    with pytest.raises(ImageError, match="remote image URLs are disabled"):
        proc(["User:", "https://example.com/cat.png", "Describe"])
    with pytest.raises(PromptError, match=r"interleaved prompt"):
        proc(["User:", {"x": 1}, "Describe"])


@pytest.mark.parametrize("hf_checkpoint", ["llava"], indirect=True)
def test_chat_template_dropping_images_is_an_error(hf_checkpoint):
    proc = Processor.from_folder(hf_checkpoint.path)
    proc.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(PromptError, match=r"template wrote 0 <image> placeholders but the messages have 1 images"):
        proc(sample_messages(1), sample_images()[:1])


def test_special_ids(hf_checkpoint):
    family, path = hf_checkpoint
    proc = ours(path)
    tok = proc.tokenizer
    assert proc.image_token == "<image>" and proc.image_token_id == tok.token_to_id("<image>")
    assert proc.eos_token_ids[0] == tok.eos_token_id
    if family == "llava":
        assert proc.bad_words_ids == [] and tok.token_to_id("<end_of_utterance>") not in proc.eos_token_ids
    else:
        assert tok.token_to_id("<end_of_utterance>") in proc.eos_token_ids
        assert proc.bad_words_ids == [[tok.token_to_id("<image>")], [tok.token_to_id("<fake_token_around_image>")]]


def test_the_request_pixel_budget_holds_in_the_python_api(hf_checkpoint_dir):
    from dataclasses import replace

    from PIL import Image

    proc = ours(hf_checkpoint_dir("llava"))
    tight = Processor(proc.tokenizer, proc.image_processor, proc.rules, family=proc.family,
                      limits=replace(proc.limits, max_request_pixels=5000))
    small = Image.new("RGB", (60, 50), (200, 30, 30))
    tight(["<image>x"], [[small]])  # 3000 pixels: within the budget
    with pytest.raises(ImageError, match="max_request_pixels=5000"):
        tight(["<image><image>x"], [[small, small]])  # 6000 pixels together
