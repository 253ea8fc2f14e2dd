"""Core parity: vlmkit loads each family's transformers checkpoint and computes the same thing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_fixtures import FAMILIES, hf_inputs, load_hf, sample_images, sample_prompt
from vlmkit.checkpoints.folder_config import CheckpointError
from vlmkit.checkpoints.hf import load_model, save_model
from vlmkit.models.kv_cache import KVCache

IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "image_attention_mask")


def model_inputs(batch) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", *IMAGE_KEYS) if k in batch}


ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


def report(line: str) -> None:
    """Measured numbers go to test-artifacts/parity.txt (and the -s output)."""
    print(line)
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "parity.txt", "a") as f:
        f.write(line + "\n")


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, hf_checkpoint_dir):
    family = request.param
    folder = hf_checkpoint_dir(family)
    hf_model, processor = load_hf(folder)
    batch = hf_inputs(family, processor, sample_images(), sample_prompt(family))
    return family, folder, hf_model, processor, model_inputs(batch)


def test_logits_match_transformers(family_setup):
    family, folder, hf_model, _, batch = family_setup
    ours = load_model(folder)
    with torch.no_grad():
        expected = hf_model(**batch).logits
        got = ours(**batch).logits
    diff = (expected - got).abs().max().item()
    report(f"{family}: max |logit diff| {diff:.2e}, {sum(p.numel() for p in ours.parameters()):,} parameters, "
           f"{batch['input_ids'].shape[1]} prompt tokens")
    assert got.shape == expected.shape
    assert diff < 1e-4


def test_kv_cache_equals_full_recompute(family_setup):
    family, folder, _, _, batch = family_setup
    model = load_model(folder)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = {k: v for k, v in batch.items() if k in IMAGE_KEYS}
    split = ids.shape[1] - 4
    with torch.no_grad():
        full = model(**batch).logits
        cache = KVCache()
        if "image_attention_mask" in images:
            images["image_attention_mask"] = images["image_attention_mask"][:, :split]
        steps = [model(ids[:, :split], attention_mask=mask[:, :split], cache=cache, **images).logits]
        for t in range(split, ids.shape[1]):
            extra = {}
            if "image_attention_mask" in batch:  # decode steps of a prompt still carry their own image rows
                extra["image_attention_mask"] = batch["image_attention_mask"][:, t : t + 1]
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, **extra).logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_batch_of_two_equals_each_alone(family_setup):
    family, folder, _, processor, _ = family_setup
    model = load_model(folder)
    a, b = sample_images()
    prompts = [sample_prompt(family, 2, images=[a, b]), sample_prompt(family, 1, images=[b])]
    if family != "idefics":  # make the second prompt longer in text so left padding is exercised both ways
        prompts[1] = prompts[1].replace("What is shown?", "Describe every colour and shape you can see, one by one, please.")
    images = [[a, b], [b]]
    processor.tokenizer.padding_side = "left"
    singles = [model_inputs(hf_inputs(family, processor, im, p)) for p, im in zip(prompts, images)]
    if family == "idefics":
        batch = processor(text=[[x if not isinstance(x, str) or x != "<image>" else x for x in p] for p in prompts],
                          return_tensors="pt", padding=True)
    else:
        batch = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    batch = model_inputs(batch)
    assert batch["attention_mask"][:, 0].min() == 0, "expected left padding in the batch"
    with torch.no_grad():
        together = model(**batch).logits
        for row, single in enumerate(singles):
            alone = model(**single).logits[0]
            n = alone.shape[0]
            assert torch.allclose(together[row, -n:], alone, atol=1e-4), f"row {row} differs"


def test_save_load_round_trip(family_setup, tmp_path):
    family, folder, hf_model, _, batch = family_setup
    model = load_model(folder)
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The written folder is the family's own format: transformers reads it back.
    reloaded = type(hf_model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, again(**batch).logits, atol=1e-4)


def test_sharded_save_round_trip(hf_checkpoint_dir, tmp_path):
    model = load_model(hf_checkpoint_dir("idefics2"))
    save_model(model, tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    again = load_model(tmp_path)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.fixture
def llava_copy(hf_checkpoint_dir, tmp_path):
    src = hf_checkpoint_dir("llava")
    (tmp_path / "config.json").write_text(open(f"{src}/config.json").read())
    return tmp_path, load_file(f"{src}/model.safetensors")


def test_missing_tensor_is_named(llava_copy):
    folder, tensors = llava_copy
    del tensors["multi_modal_projector.linear_2.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['multi_modal_projector.linear_2.bias'\]"):
        load_model(folder)


def test_unexpected_tensor_is_named(llava_copy):
    folder, tensors = llava_copy
    tensors["multi_modal_projector.linear_3.weight"] = torch.zeros(2, 2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected \['multi_modal_projector.linear_3.weight'\]"):
        load_model(folder)


def test_misshaped_tensor_is_named(llava_copy):
    folder, tensors = llava_copy
    tensors["multi_modal_projector.linear_2.bias"] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped.*linear_2.bias: \(3,\)"):
        load_model(folder)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(tmp_path)


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unsupported architecture.*BertModel"):
        load_model(tmp_path)


def test_import_is_light():
    code = (
        "import sys, vlmkit; vlmkit.__version__; "
        "heavy = [m for m in ('transformers', 'gradio', 'fastapi', 'PIL', 'tokenizers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
