"""Quantized layers off the CPU (vlmkit/models/quant_cuda.py), everything a CPU can check: the tinygemm layout against a
line-by-line transcription of torch's CUDA packing kernel, the dequantizing fallback, the kernel dispatch, repacking
when a module moves, QLoRA's backward through the non-CPU layouts, and that int4 is no longer refused off the CPU.
The real CUDA ops are checked by `python -m bench.gpu` (tests/test_bench_gpu.py runs its CPU form)."""

from __future__ import annotations

import pytest
import torch

from vlmkit.models import quant, quant_cuda
from vlmkit.models.quant import Int4Linear, Int8Linear, quantize_int4, train_through_quantized


def transcribed_cuda_pack(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """torch's matrix_to_m16n8k16_Bint4_layout (int4mm.cu, NVIDIA branch) written out loop by loop, on the bytes
    gpt-fast hands it (`w[:, ::2] << 4 | w[:, 1::2]`)."""
    n, k = q.shape
    inp = quant_cuda.kernel_bytes(q).tolist()  # [n][k / 2]
    n_tiles, k_super = -(-n // 8), k // (inner_k_tiles * 16)
    out = torch.zeros(n_tiles, k_super, 32, inner_k_tiles // 2, dtype=torch.int64)
    for k_outer in range(k_super):  # blockIdx.x
        for n_tile in range(n_tiles):  # blockIdx.y
            for t in range(32):  # threadIdx.x
                for inner in range(0, inner_k_tiles, 2):
                    n0 = n_tile * 8 + t // 4
                    k_base0 = (k_outer * inner_k_tiles + inner) * 16 // 2
                    ks = [k_base0 + t % 4, k_base0 + t % 4 + 4, k_base0 + 8 + t % 4, k_base0 + 8 + t % 4 + 4]
                    v = [inp[n0][kk] if n0 < n and kk < k // 2 else 0 for kk in ks]
                    pack = ((v[3] & 0xF) << 28 | (v[2] & 0xF) << 24 | (v[1] & 0xF) << 20 | (v[0] & 0xF) << 16
                            | (v[3] & 0xF0) << 8 | (v[2] & 0xF0) << 4 | (v[1] & 0xF0) | (v[0] & 0xF0) >> 4)
                    out[n_tile, k_outer, t, inner // 2] = pack
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("n, k, tiles", [(16, 64, 2), (8, 128, 4), (24, 256, 8), (12, 64, 2)])
def test_tinygemm_packing_is_the_cuda_kernels(n, k, tiles):
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n + k))
    packed = quant_cuda.pack_tinygemm(q, tiles)
    assert torch.equal(packed, transcribed_cuda_pack(q, tiles))
    assert torch.equal(quant_cuda.unpack_tinygemm(packed, n, k), q.to(torch.uint8))


def test_kernel_bytes_put_the_even_column_high_and_inner_tiles_follow_k():
    q = torch.tensor([[1, 2, 3, 4]])
    assert quant_cuda.kernel_bytes(q).tolist() == [[0x12, 0x34]]
    assert quant_cuda.pack_nibbles(q).tolist() == [[0x21, 0x43]]  # the plain layout: the other way round
    assert [quant_cuda.inner_k_tiles(k) for k in (128, 192, 96, 11008, 4160)] == [8, 4, 2, 8, 4]
    with pytest.raises(ValueError, match="multiple of 32"):
        quant_cuda.inner_k_tiles(48)
    with pytest.raises(ValueError, match="not a tinygemm int4 layout"):
        quant_cuda.unpack_tinygemm(torch.zeros(2, 1, 32, 1, dtype=torch.int32), 16, 64)


def test_layout_follows_the_device_and_the_kernels_limits(monkeypatch):
    assert quant_cuda.int4_layout("cpu", 16, 64, 32) == "cpu"
    assert quant_cuda.int4_layout("meta", 16, 64, 32) == "plain"  # no kernel: dequantized per call
    monkeypatch.setattr(quant_cuda, "cuda_int4_kernel", lambda device: True)
    assert quant_cuda.int4_layout("cuda:0", 16, 64, 32) == "cuda"
    assert quant_cuda.int4_layout("cuda:0", 12, 64, 32) == "plain"  # rows not a multiple of 8
    assert quant_cuda.int4_layout("cuda:0", 16, 96, 48) == "plain"  # a group size tinygemm lacks
    monkeypatch.undo()
    if not torch.cuda.is_available():
        assert not quant_cuda.cuda_int4_kernel(torch.device("cuda", 0))


def test_kernel_dispatch_by_device_and_rows(monkeypatch):
    monkeypatch.setattr(quant_cuda, "has_kernel", lambda op, key: key == "CUDA")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert quant_cuda.use_kernel("_weight_int8pack_mm", cuda, 1)
    assert not quant_cuda.use_kernel("_weight_int8pack_mm", cuda, quant_cuda.INT8_KERNEL_ROWS + 1)
    assert quant_cuda.use_kernel("_weight_int4pack_mm", cuda, quant_cuda.INT4_KERNEL_ROWS)
    assert not quant_cuda.use_kernel("_weight_int4pack_mm", cuda, 600)  # a prefill: dequantize + GEMM
    assert not quant_cuda.use_kernel("_weight_int4pack_mm", cpu, 1)
    monkeypatch.setattr(quant_cuda, "has_kernel", lambda op, key: False)  # a torch without the CUDA op
    assert not quant_cuda.use_kernel("_weight_int8pack_mm", cuda, 1)


def test_has_kernel_reads_torchs_registry():
    assert quant_cuda.has_kernel("_weight_int8pack_mm", "CPU")
    assert not quant_cuda.has_kernel("no_such_op_anywhere", "CPU")


def _float_reference(module: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ module.dequantize().t() + (0 if module.bias is None else module.bias)


@pytest.mark.parametrize("layout", ["plain", "cuda"])
def test_non_cpu_layouts_compute_the_same_layer(monkeypatch, layout):
    torch.manual_seed(0)
    w, b = torch.randn(48, 128), torch.randn(48)
    on_cpu = Int4Linear.from_float(w, b, group_size=32)
    monkeypatch.setattr(quant_cuda, "int4_layout", lambda device, n, k, g: layout)
    moved = Int4Linear.from_float(w, b, group_size=32)  # packed as the fake device would (reference packer)
    assert moved.layout == layout
    assert torch.equal(moved.values(), on_cpu.values())
    for key, value in on_cpu.export().items():
        assert torch.equal(moved.export()[key], value), key
    x = torch.randn(2, 5, 128)
    expected = _float_reference(on_cpu, x)
    assert torch.allclose(moved(x), expected, atol=1e-4, rtol=1e-4)  # the fallback: float32 GEMM, no bf16 rounding
    assert torch.allclose(on_cpu(x), expected, atol=0.15, rtol=0.02)  # the CPU kernel (bf16 activations)


def test_moving_a_module_repacks_it_for_the_target_device(monkeypatch):
    torch.manual_seed(1)
    module = Int4Linear.from_float(torch.randn(32, 64), group_size=32)
    packed, values = module.packed.clone(), module.values()
    module._nibbles = "cached on the old device"  # QLoRA's backward cache must not survive a move
    monkeypatch.setattr(quant_cuda, "int4_layout", lambda device, n, k, g: "cuda")  # "the CPU is a GPU now"
    module.to("cpu")
    assert module.layout == "cuda" and module.packed.dtype == torch.int32 and not hasattr(module, "_nibbles")
    assert torch.equal(module.values(), values)
    x = torch.randn(3, 64)
    assert torch.allclose(module(x), _float_reference(module, x), atol=1e-4)
    monkeypatch.undo()
    module.cpu()  # back to the CPU's own layout, bit for bit
    assert module.layout == "cpu" and torch.equal(module.packed, packed)
    ptr = module.packed.data_ptr()
    module.to(torch.bfloat16).to("cpu")  # no change of device: nothing repacked
    assert module.layout == "cpu" and module.packed.data_ptr() == ptr


def test_a_whole_model_moves_and_stays_equal(monkeypatch):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 64))
    for i in (0, 2):
        model[i] = Int4Linear.from_float(model[i].weight.data, model[i].bias.data, group_size=32)
    x = torch.randn(4, 64)
    before = model(x)
    monkeypatch.setattr(quant_cuda, "int4_layout", lambda device, n, k, g: "plain")
    model.to("cpu")
    assert {m.layout for m in model if isinstance(m, Int4Linear)} == {"plain"}
    assert torch.allclose(model(x), before, atol=0.1, rtol=0.02)  # kernel (bf16) vs float32 fallback


def test_int8_fallback_scales_the_output():
    torch.manual_seed(3)
    module = Int8Linear.from_float(torch.randn(40, 96), torch.randn(40))
    x = torch.randn(7, 96)
    y = quant_cuda.int8_mm(x, module.qweight, module.scales) + module.bias
    assert torch.allclose(y, x @ module.dequantize().t() + module.bias, atol=1e-4, rtol=1e-4)


def test_int4_dequantize_is_the_kernels_formula():
    q, scales, mins = quantize_int4(torch.randn(16, 64), 32)
    module = Int4Linear(q, scales, mins, 32)
    w = quant_cuda.int4_dequantize(module.values(), module.scales_and_zeros, 32, torch.float32)
    assert torch.allclose(w, module.dequantize(), atol=1e-6)


def test_qlora_backward_through_the_non_cpu_layouts(monkeypatch):
    torch.manual_seed(4)
    monkeypatch.setattr(quant_cuda, "int4_layout", lambda device, n, k, g: "cuda")
    module = Int4Linear.from_float(torch.randn(32, 64), group_size=32)
    train_through_quantized(module)
    x = torch.randn(3, 64, requires_grad=True)
    module(x).sum().backward()
    assert torch.allclose(x.grad, module.dequantize().sum(0).expand(3, -1), atol=1e-4)


def test_int4_is_not_refused_off_the_cpu(monkeypatch):
    import vlmkit.api as api
    import vlmkit.train.finetune as finetune

    assert "int4 runs on torch's CPU kernels" not in open(api.__file__).read()
    assert "int4 runs on torch's CPU kernels" not in open(finetune.__file__).read()
    class Meta(torch.nn.Module):  # the quantizer on another device than the CPU: "meta" stands in for it
        def __init__(self):
            super().__init__()
            with torch.device("meta"):
                self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 32)])

    m = quant.quantize_model(Meta(), "int4")
    assert m.layers[0].layout == "plain" and m.layers[0].packed.device.type == "meta"
