"""The quantized layers' prefill path (a float GEMM on the layer dequantized a slice at a time) against their
decode path (torch's packed kernels): same weights, same outputs within the kernels' bf16 rounding, on both sides
of the row threshold; the int4 packed layout read back exactly; greedy text unchanged."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from hf_fixtures import sample_images
from vlmkit.models import quant_kernels
from vlmkit.models.quant import Int4Linear, Int8Linear

A, _ = sample_images()
PROMPT = "<image>What is shown?"


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("n, k, g", [(48, 64, 32), (80, 128, 64), (16, 32, 32), (256, 256, 128)])
def test_int4_packed_layout_is_read_back_exactly(n, k, g):
    m = Int4Linear.from_float(torch.randn(n, k), group_size=g)
    assert torch.equal(quant_kernels.int4_values(m.packed, n, k), m.values())  # the kernel's own reading
    wt = quant_kernels.int4_dequantize_t(m.packed, m.scales_and_zeros, g, n, k, torch.float32)
    assert torch.equal(wt.t(), m.dequantize())


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_and_decode_paths_agree_on_both_sides_of_the_threshold(cls, dtype, monkeypatch):
    torch.manual_seed(0)
    layer = cls.from_float(torch.randn(96, 64) / 8, torch.randn(96), dtype=dtype)
    w = layer.dequantize()
    t = quant_kernels.PREFILL_ROWS
    for rows in (1, t - 1, t, 3 * t + 5):
        x = torch.randn(1, rows, 64, dtype=dtype)
        ref = x.float() @ w.t() + layer.bias.float()
        y = layer(x)
        assert y.shape == (1, rows, 96) and y.dtype == dtype
        exact = rows >= t and dtype == torch.float32  # the prefill path computes in float32 on the same weights
        assert rel_err(y, ref) < (1e-5 if exact else 2e-2), rows
        with monkeypatch.context() as mp:  # the same rows forced through the kernels
            mp.setattr(quant_kernels, "PREFILL_ROWS", 10**9)
            assert rel_err(layer(x), y) < 2e-2


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_big_layers_go_through_slices_of_output_rows(cls, monkeypatch):
    layer = cls.from_float(torch.randn(160, 64))
    x = torch.randn(40, 64)
    whole = layer(x)
    monkeypatch.setattr(quant_kernels, "TEMP_ELEMS", 64 * 32)  # 32 rows at a time: 5 slices (int4: row blocks)
    assert torch.allclose(layer(x), whole, atol=1e-5)


def test_an_unknown_int4_layout_keeps_the_kernel(monkeypatch):
    layer = Int4Linear.from_float(torch.randn(64, 64))
    x = torch.randn(50, 64)
    monkeypatch.setitem(quant_kernels._LAYOUT, "bn", None)
    assert quant_kernels.int4_prefill(x, layer.packed, layer.scales_and_zeros, 32, 64, 64) is None
    assert rel_err(layer(x), x @ layer.dequantize().t()) < 2e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_text_is_unchanged_by_the_prefill_path(hf_checkpoint_dir, mode, monkeypatch):
    m = vlmkit.load(hf_checkpoint_dir("idefics3"), quantize=mode, caches=False)
    rows = m.processor([PROMPT], [[A]])["input_ids"].shape[1]
    monkeypatch.setattr(quant_kernels, "PREFILL_ROWS", rows // 2)  # the tiny prompt (and image) take the prefill path
    text = m.generate(PROMPT, images=[A], max_new_tokens=8)
    monkeypatch.setattr(quant_kernels, "PREFILL_ROWS", 10**9)  # before: every row through the kernels
    assert m.generate(PROMPT, images=[A], max_new_tokens=8) == text
