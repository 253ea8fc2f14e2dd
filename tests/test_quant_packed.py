"""int8 layers on fbgemm's packed weight (one copy; the int8 GEMM for every row count): close to the plain int8
layer, the same export and saved folder, greedy text unchanged; where torch cannot pack, the plain layers stay."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from hf_fixtures import sample_images
from vlmkit.models import quant_kernels
from vlmkit.models.quant import Int8Linear, memory_bytes
from vlmkit.models.quant_packed import PackedInt8Linear, pack_model

A, _ = sample_images()
PROMPT = "<image>What is shown?"
needs_fbgemm = pytest.mark.skipif(quant_kernels._engine() is None, reason="this torch has no fbgemm")


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _layer():
    torch.manual_seed(0)
    return Int8Linear.from_float(torch.randn(96, 64) / 8, torch.randn(96))


@needs_fbgemm
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_packed_layer_is_close_to_the_int8_layer_and_exports_the_same_weights(rows):
    plain = _layer()
    packed = PackedInt8Linear.from_int8(plain.qweight, plain.scales, plain.bias)
    assert torch.equal(packed.export()["qweight"], plain.qweight)
    assert torch.equal(packed.export()["scales"], plain.scales.float())
    x = torch.randn(2, rows, 64)
    y = packed(x)
    assert y.shape == (2, rows, 96) and y.dtype == torch.float32
    assert rel_err(y, x @ plain.dequantize().t() + plain.bias) < 0.03  # 7-bit activations per row
    assert rel_err(packed(x.bfloat16()), y) < 0.03


@needs_fbgemm
def test_rows_of_very_different_range_are_quantized_each_on_its_own():
    packed = PackedInt8Linear.from_int8(*_layer().export().values())
    x = torch.randn(4, 64) * torch.tensor([1e-3, 1.0, 1e3, 0.0])[:, None]
    y, ref = packed(x), x @ packed.dequantize().t()
    for i in range(3):
        assert rel_err(y[i], ref[i]) < 0.03, i
    assert torch.equal(y[3], torch.zeros(96))  # an all-zero row (padding) stays finite and zero


def test_without_a_packing_backend_the_plain_layers_stay(monkeypatch):
    model = torch.nn.Sequential(_layer())
    monkeypatch.setitem(quant_kernels._ENGINE, "name", None)
    assert quant_kernels.pack_int8(model[0].qweight, model[0].scales) is None
    assert pack_model(model) == [] and type(model[0]) is Int8Linear


@pytest.fixture(scope="module")
def folder(hf_checkpoint_dir):
    return hf_checkpoint_dir("idefics3")


def _logits(m):
    batch = m.processor([PROMPT], [[A]])
    with torch.no_grad():
        return m.model(**batch).logits[0, -8:]


@needs_fbgemm
@pytest.mark.parametrize("vision", [False, True])
def test_packed_int8_model_stays_close_and_saves_the_plain_int8_weights(folder, tmp_path, vision):
    f = vlmkit.load(folder, caches=False)
    m = vlmkit.load(folder, quantize="int8", caches=False)
    plain, plain_bytes = _logits(m), memory_bytes(m.model)
    names = pack_model(m.model, vision=vision)
    assert names and not any(n.endswith(("lm_head", "embed_tokens")) for n in names)
    assert any(n.startswith("vision.") for n in names) == vision
    if not vision:  # one copy: the packed weights take the plain int8 weights' place
        assert abs(memory_bytes(m.model) - plain_bytes) < 0.02 * plain_bytes
    # 7-bit activations (no VNNI here): ~2x the plain int8 layers' error; test_quantize's int8 bound is 0.04
    assert rel_err(_logits(m), _logits(f)) < 0.06
    m.generate(PROMPT, images=[A], max_new_tokens=4)  # decode runs through the packed layers too
    vlmkit.save(m, tmp_path)
    back = vlmkit.load(tmp_path, caches=False)
    assert back.quantization["modules"] == m.quantization["modules"]
    if not vision:  # the plain int8 model, bit for bit
        assert torch.equal(_logits(back), plain)


@needs_fbgemm
@pytest.mark.parametrize("mode, bound", [("int8", 0.04), ("int4", 0.25)])  # test_quantize's bounds
def test_vision_only_packing_keeps_the_quantized_targets(folder, mode, bound):
    f = vlmkit.load(folder, caches=False)
    m = vlmkit.load(folder, quantize=mode, caches=False)
    text = m.generate(PROMPT, images=[A], max_new_tokens=8)
    names = pack_model(m.model, vision=True, decoder=False)
    assert names and all(n.startswith(("vision.", "connector.")) for n in names)
    assert rel_err(_logits(m), _logits(f)) < bound
    if mode == "int8":  # as test_quantize: greedy tokens stay at 8 bits (int4 has only the logits bound)
        assert m.generate(PROMPT, images=[A], max_new_tokens=8) == text
