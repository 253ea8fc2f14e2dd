"""Decode-time fused int4 projections (vlmkit.models.fused): same logits as the separate layers, no second copy of
the weights, checkpoints and training untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmkit.config import TextConfig
from vlmkit.models import fused, int4_cpu, quant
from vlmkit.models.kv_cache import StaticKVCache
from vlmkit.models.layers import init_normal_
from vlmkit.models.lora import LoRALinear
from vlmkit.models.text import TextDecoder

# Row counts on whole 64-row blocks (the packer's block on AVX-512; 32 on AVX2): every group fuses on both.
CFG = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)


def decoder(**overrides) -> TextDecoder:
    torch.manual_seed(0)
    m = TextDecoder(TextConfig(**{**CFG, **overrides}))
    init_normal_(m, 0.05)
    return quant.quantize_model(m.eval(), "int4")


def step_logits(dec: TextDecoder, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the last token through `decode_step`, the others prefilled through `forward`."""
    cache = StaticKVCache(len(dec.layers), 64)
    with torch.no_grad():
        dec(input_ids=ids[:, :-1], cache=cache)
        n, b = cache.length, ids.shape[0]
        key_mask = torch.zeros(b, cache.capacity, dtype=torch.bool)
        key_mask[:, :n] = True
        return dec.decode_step(ids[:, -1:], torch.full((b, 1), n), torch.tensor([n]), key_mask, cache.keys,
                               cache.values, length=n + 1)


def full_logits(dec: TextDecoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dec(input_ids=ids).logits[:, -1]


IDS = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def torch_kernel(monkeypatch):
    """torch's int4 kernel everywhere (the AVX2 kernel off): fused and separate layers then agree to rounding."""
    monkeypatch.setitem(int4_cpu._STATE, "fn", None)


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fused_decode_equals_separate_layers_and_the_forward(torch_kernel):
    dec = decoder()
    plain = copy.deepcopy(dec)
    plain._fuse = False
    fused_logits = step_logits(dec, IDS)
    groups = dec.__dict__["_fused_projections"]
    assert all(g.qkv is not None and g.gate_up is not None for g in groups)
    assert groups[0].qkv.out_features == 128 + 64 + 64 and groups[0].gate_up.out_features == 2 * 256
    torch.testing.assert_close(fused_logits, step_logits(plain, IDS), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_logits, full_logits(dec, IDS), atol=1e-4, rtol=1e-4)


def test_fusing_keeps_one_copy_of_the_weights_and_the_saved_tensors():
    dec = decoder()
    before = {name: {k: v.clone() for k, v in m.export().items()}
              for name, m in dec.named_modules() if isinstance(m, quant.Int4Linear)}
    keys, nbytes = list(dec.state_dict()), quant.memory_bytes(dec)
    groups = fused.decode_projections(dec)
    q = dec.layers[0].attn.q_proj
    assert q.packed.data_ptr() == groups[0].qkv.packed.data_ptr()  # a view of the fused rows, not a copy
    assert list(dec.state_dict()) == keys and quant.memory_bytes(dec) == nbytes
    for name, m in dec.named_modules():
        if isinstance(m, quant.Int4Linear):
            for k, v in m.export().items():
                assert torch.equal(v, before[name][k]), (name, k)
    x = torch.randn(2, 128)  # a layer called alone still computes with its own rows (strided scales)
    torch.testing.assert_close(q(x), x @ q.dequantize().t(), atol=0.05, rtol=0.05)


def test_lora_and_training_hooks_turn_fusion_off_for_what_they_touch(torch_kernel):
    dec = decoder()
    step_logits(dec, IDS)  # fused once
    attn = dec.layers[0].attn
    attn.q_proj = LoRALinear(attn.q_proj, r=4)
    torch.nn.init.normal_(attn.q_proj.lora_B, std=0.5)  # an adapter that changes the output
    groups = fused.decode_projections(dec)
    assert groups[0].qkv is None and groups[0].gate_up is not None and groups[1].qkv is not None
    torch.testing.assert_close(step_logits(dec, IDS), full_logits(dec, IDS), atol=1e-4, rtol=1e-4)
    quant.train_through_quantized(dec.layers[1].mlp.up_proj)
    assert fused.decode_projections(dec)[1].gate_up is None


def test_groups_that_cannot_stack_stay_separate():
    dec = decoder()
    dec.layers[0].mlp.gate_proj = quant.Int8Linear.from_float(torch.randn(256, 128))
    dec.layers[1].attn.k_proj.bias = torch.nn.Parameter(torch.zeros(64), requires_grad=False)
    groups = fused.decode_projections(dec)
    assert groups[0].gate_up is None and groups[1].qkv is None and groups[0].qkv is not None
    float_dec = TextDecoder(TextConfig(**CFG))
    assert all(g.qkv is None and g.gate_up is None for g in fused.decode_projections(float_dec))


@pytest.mark.parametrize("rows", [1, 300])  # a decode row; a prefill (the layers' own dequantized path)
def test_fused_group_returns_each_layers_output(rows, torch_kernel):
    dec = decoder()
    a = dec.layers[0].attn
    x = torch.randn(rows, 128)
    expected = [a.q_proj(x), a.k_proj(x), a.v_proj(x)]
    got = fused.decode_projections(dec)[0].qkv(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


needs_kernel = pytest.mark.skipif(not int4_cpu.available(), reason="the AVX2 int4 kernel does not run here")


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 7])  # row tiles of 4, 2 and 1
def test_avx2_kernel_equals_the_dequantized_product(group, rows):
    g = torch.Generator().manual_seed(group + rows)
    layer = quant.Int4Linear.from_float(torch.randn(96, 256, generator=g) * 0.05, group_size=group)
    x = torch.randn(rows, 256, generator=g)
    exact = x @ layer.dequantize().t()
    y = int4_cpu.gemm(x, layer.packed, layer.scales_and_zeros, group, 96)
    assert y.shape == (rows, 96) and rel_err(y, exact) < 0.01  # int8 activations: ~0.5%
    assert rel_err(layer(x), exact) < 0.01  # torch's bf16 kernel, for scale


@needs_kernel
def test_avx2_kernel_declines_what_it_cannot_read():
    layer = quant.Int4Linear.from_float(torch.randn(96, 256), group_size=32)
    x = torch.randn(1, 256)
    sz = layer.scales_and_zeros
    assert int4_cpu.gemm(torch.randn(17, 256), layer.packed, sz, 32, 96) is None  # too many rows
    assert int4_cpu.gemm(x, layer.packed, torch.cat([sz, sz], 1)[:, :96], 32, 96) is None  # strided scales
    assert int4_cpu.gemm(x, layer.packed, sz.float(), 32, 96) is None
    assert int4_cpu.gemm(x, layer.packed[:48], sz, 32, 96) is None


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_on_the_avx2_kernel_stays_close_to_the_forward(batch):
    dec = decoder()
    ids = IDS[:batch]
    assert rel_err(step_logits(dec, ids), full_logits(dec, ids)) < 0.02


def test_a_model_saved_after_fused_decoding_writes_the_original_tensors(hf_checkpoint_dir, tmp_path):
    import vlmkit
    from safetensors.torch import load_file
    from hf_fixtures import sample_images

    folder = hf_checkpoint_dir("idefics3")
    image, _ = sample_images()
    m = vlmkit.load(folder, quantize="int4", caches=False)
    vlmkit.save(m, tmp_path / "before")
    text = m.generate("<image>What is shown?", images=[image], max_new_tokens=4)  # decode steps fuse the layers
    groups = m.model.text.__dict__["_fused_projections"][0]
    # which groups fuse depends on the CPU's packed block rows (q/k/v need k and v rows on whole blocks)
    assert groups.gate_up is not None or groups.qkv is not None
    vlmkit.save(m, tmp_path / "after")
    before, after = ({k: v for f in (tmp_path / d).glob("*.safetensors") for k, v in load_file(str(f)).items()}
                     for d in ("before", "after"))
    assert before
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    back = vlmkit.load(tmp_path / "after", caches=False)
    assert back.generate("<image>What is shown?", images=[image], max_new_tokens=4) == text


def test_a_group_follows_its_layers_weights_when_they_are_replaced(torch_kernel):
    dec = decoder()
    first = fused.decode_projections(dec)[0]
    q = dec.layers[0].attn.q_proj
    q.packed = q.packed.clone()  # what moving the model (`.to()`) does to every buffer
    again = fused.decode_projections(dec)[0]
    assert again.qkv is not first.qkv and again.gate_up is first.gate_up
    assert again.qkv.packed.data_ptr() != first.qkv.packed.data_ptr()
