"""bench/gpu.py (`python -m bench.gpu`) in its CPU form: tiny LLaVA- and Idefics2-shaped models, the quantized-layer
checks, the layer table and the report file. Nothing is timed here; the GPU run is the one that measures."""

from __future__ import annotations

import pytest
import torch

from bench import gpu


def test_tiny_run_on_the_cpu_writes_the_report(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert gpu.main(["--tiny", "--device", "cpu", "--new-tokens", "3", "--batch", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "measured read bandwidth" in text and "**NO**" not in text
    assert "| int4 moved back to the CPU == its CPU packing | yes |" in text
    assert "| int4 layer packed for the device's kernel | yes | 64x128: cpu |" in text
    assert "| QLoRA backward through int4 on the device | yes |" in text
    assert "## One 64x128 layer" in text
    assert text.count("| QLoRA step on the model (int4 base on the device) | yes |") == 2
    for model in ("LLaVA-1.5-7B (tiny)", "Idefics2-8B (tiny)"):
        for row in ("transformers bf16", "vlmkit bf16", "vlmkit int8", "vlmkit int4"):
            assert f"| {model} | {row} |" in text
    assert "decode tok/s, batch 2" in text
    assert text in capsys.readouterr().out


def test_the_model_source_holds_the_transformers_tensors():
    import transformers as tf

    cfg = gpu.hf_config("idefics2", tiny=True)
    hf = tf.Idefics2ForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).eval()
    source = gpu.HFModelSource(hf)
    model = gpu.build_model(source.cfg, source, torch.bfloat16)
    shared = {p.data_ptr() for p in hf.parameters()}
    assert all(p.data_ptr() in shared for p in model.parameters())  # no copy: the bench's GPU holds one model
    batch = gpu.inputs(cfg, "idefics2", 1, torch.device("cpu"))
    with torch.no_grad():
        ours, theirs = model(**batch).logits, hf(**batch).logits
    assert (ours.float() - theirs.float()).abs().max() < 0.05 * theirs.float().abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_asking_for_cuda_without_one_says_so(capsys):
    assert gpu.main(["--tiny"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_every_attention_of_the_benched_models_is_sdpa(monkeypatch):
    """SDPA on every device: vision, perceiver and decoder all attend through F.scaled_dot_product_attention (the
    one `attention` in models/layers.py), never a hand-written softmax (but for Gemma 2's soft-capped scores, which
    SDPA cannot compute)."""
    import pathlib

    import torch.nn.functional as F

    import vlmkit.models as models

    for path in pathlib.Path(models.__file__).parent.glob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        if path.name == "layers.py":  # the one soft-capped branch of `attention`
            code = code.replace("torch.softmax(scores, dim=-1, dtype=torch.float32)", "", 1)
        assert ".softmax(" not in code and "F.softmax" not in code, path.name
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = gpu.hf_config("idefics2", tiny=True)
    import transformers as tf

    hf = tf.Idefics2ForConditionalGeneration._from_config(cfg, dtype=torch.float32).eval()
    source = gpu.HFModelSource(hf)
    model = gpu.build_model(source.cfg, source, torch.float32)
    with torch.no_grad():
        model(**gpu.inputs(cfg, "idefics2", 1, torch.device("cpu")))
    layers = cfg.vision_config.num_hidden_layers + cfg.perceiver_config.resampler_depth + \
        cfg.text_config.num_hidden_layers
    assert len(calls) == layers


def test_a_failing_row_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu, "vlmkit_speed", broken)
    out = tmp_path / "gpu.md"
    assert gpu.main(["--tiny", "--device", "cpu", "--new-tokens", "2", "--batch", "2", "--families", "llava",
                     "--out", str(out)]) == 1
    text = out.read_text()
    assert "| LLaVA-1.5-7B (tiny) | vlmkit int4 | RuntimeError: boom |" in text
    assert "| LLaVA-1.5-7B (tiny) | transformers bf16 | " in text and "QLoRA step on the model" in text


@pytest.mark.parametrize("family, billions", [("llava", 7.06), ("idefics2", 8.40)])
def test_the_real_shapes_convert_on_the_meta_device(family, billions):
    """The GPU run's real shapes (no memory: meta tensors): transformers' model, its config and every tensor map
    onto vlmkit's model, and int4 takes every decoder projection."""
    import transformers as tf

    from vlmkit.models.quant import QuantSpec

    cls = tf.LlavaForConditionalGeneration if family == "llava" else tf.Idefics2ForConditionalGeneration
    with torch.device("meta"):
        hf = cls._from_config(gpu.hf_config(family, tiny=False), dtype=torch.bfloat16)
    source = gpu.HFModelSource(hf)
    model = gpu.build_model(source.cfg, source, torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in hf.parameters()) and abs(n / 1e9 - billions) < 0.01
    kinds = QuantSpec("int4").kinds(model)  # what a quantized build makes of each module (by names and shapes)
    assert list(kinds.values()).count("int4") == 7 * hf.config.text_config.num_hidden_layers
