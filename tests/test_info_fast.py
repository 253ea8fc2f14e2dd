"""`vlmkit info`'s torch-free path (vlmkit.checkpoints.header_info): the same dict as `api.describe` for every family
it answers for, None (describe() then answers) wherever it cannot be sure, and no `import torch` in `vlmkit info`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vlmkit
from hf_fixtures import FAMILIES
from vlmkit import api, cli, hardware, machine
from vlmkit.checkpoints import header_info
from vlmkit.checkpoints.header_info import describe_from_headers

ROOT = Path(__file__).parent.parent
HAS_DEFAULT = (api.default_model_path() / "config.json").is_file()
REAL_FLAGS = machine.cpu_flags  # taken at import, before conftest's session patch


def assert_same(folder, native_resolution=None, **kwargs):
    """The fast dict is describe()'s (conftest gives both the same CPU flags). Where a GPU driver is present,
    "auto" is torch's to decide: the comparison is made on the CPU."""
    if not header_info.surely_cpu_only():
        kwargs.setdefault("device", "cpu")
    fast = describe_from_headers(folder, native_resolution=native_resolution, **kwargs)
    assert fast is not None, "the fast path declined"
    assert fast == api.describe(folder, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [None, "bf16", "float16"])
def test_hf_families_as_described(hf_checkpoint_dir, family, dtype):
    assert_same(hf_checkpoint_dir(family), dtype=dtype)


def test_cpu_dtype_from_the_same_flags(hf_checkpoint_dir, monkeypatch):
    for module in (hardware, header_info):
        monkeypatch.setattr(module, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert_same(hf_checkpoint_dir("llava"))
    if header_info.surely_cpu_only():
        assert describe_from_headers(hf_checkpoint_dir("llava"))["dtype"] == "bfloat16"


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_gemma_families_as_described(tmp_path, family):
    from gemma_fixtures import build_checkpoint

    assert_same(build_checkpoint(family, str(tmp_path)))


def test_mllama_cross_attention_layers_from_the_config(tmp_path):
    """Mllama keeps its cross-attention layers in the decoder's own stack: the config says which they are."""
    from mllama_fixtures import build_checkpoint

    folder = build_checkpoint(str(tmp_path))
    assert_same(folder)
    assert describe_from_headers(folder)["cross_attention_parameters"] > 0


def test_llava_next_tiling_as_described(tmp_path):
    """LLaVA-NeXT: the most tokens an image can take and its grids (anyres_grid), the row separator with the
    connector."""
    import transformers as tf
    from hf_fixtures import _TEXT, _VISION, _quiet

    _quiet()
    cfg = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(image_size=42, patch_size=14, projection_dim=32,
                                          **{**_VISION, "num_hidden_layers": 2}),
        text_config=tf.MistralConfig(vocab_size=300, sliding_window=None, **_TEXT), image_token_index=299,
        image_grid_pinpoints=[[42, 84], [84, 42], [84, 84]], vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    tf.LlavaNextForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tf.LlavaNextImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42},
                                  image_grid_pinpoints=cfg.image_grid_pinpoints).save_pretrained(tmp_path)
    assert_same(tmp_path)
    assert describe_from_headers(tmp_path, device="cpu")["anyres_grids"] == [[1, 2], [2, 1], [2, 2]]


@pytest.mark.parametrize("qwen25", [False, True])
def test_qwen2_vl_with_the_processors_pixel_range(tmp_path, capsys, qwen25):
    """Qwen2-VL's token range comes from its image processor: read by processing/ (the CLI passes it in); without
    that reading the fast path declines."""
    from qwen_fixtures import build_checkpoint
    from vlmkit.processing.image_ops import native_resolution_of_folder

    folder = build_checkpoint(str(tmp_path), qwen25=qwen25)
    assert describe_from_headers(folder) is None
    assert_same(folder, native_resolution=native_resolution_of_folder)
    assert cli.main(["info", folder, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == api.describe(folder)


@pytest.mark.skipif(not HAS_DEFAULT, reason="the embedded default model is not installed")
@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_default_model_as_described(dtype):
    assert_same("default", dtype=dtype, device="cpu")
    assert describe_from_headers("default")["folder"] == str(api.default_model_path())


def test_sharded_folder(hf_checkpoint_dir, tmp_path):
    from vlmkit.checkpoints.hf import save_model

    m = vlmkit.load(hf_checkpoint_dir("llava"))
    save_model(m.model, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same(tmp_path)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llava", "idefics"])
def test_saved_quantized_folders(hf_checkpoint_dir, tmp_path, family, mode):
    """Quantized layers count out x in parameters and their in-memory buffers' bytes, as describe() counts them."""
    vlmkit.save(vlmkit.load(hf_checkpoint_dir(family), quantize=mode), tmp_path / "q")
    assert_same(tmp_path / "q")
    assert_same(tmp_path / "q", dtype="bf16")
    assert describe_from_headers(tmp_path / "q", device="cpu")["quantization"] == mode


@pytest.mark.skipif(not HAS_DEFAULT, reason="the embedded default model is not installed")
def test_saved_quantized_default_model(tmp_path):
    vlmkit.save(vlmkit.load("default", quantize="int4"), tmp_path / "q")
    assert_same(tmp_path / "q")


def test_declines_where_torch_must_decide(hf_checkpoint_dir, monkeypatch):
    folder = hf_checkpoint_dir("llava")
    for kwargs in (dict(device="cuda"), dict(device="cuda:0"), dict(device="mps"), dict(device="nonsense"),
                   dict(dtype="int8"), dict(dtype=object())):
        assert describe_from_headers(folder, **kwargs) is None, kwargs
    monkeypatch.setattr(header_info, "surely_cpu_only", lambda: False)  # a GPU driver, or macOS
    assert describe_from_headers(folder) is None and describe_from_headers(folder, device="auto") is None
    assert describe_from_headers(folder, device="cpu") is not None


def test_info_command_falls_back_to_describe(hf_checkpoint_dir, monkeypatch, capsys):
    """Where the fast path declines, `vlmkit info` says what describe() says, its errors included."""
    folder = hf_checkpoint_dir("llava")
    calls = []
    monkeypatch.setattr(api, "describe", lambda *a, **k: calls.append(k) or {"asked": k})
    monkeypatch.setattr(header_info, "surely_cpu_only", lambda: False)
    assert cli.main(["info", folder, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"asked": {"dtype": None, "device": "auto"}}
    assert cli.main(["info", folder, "--json", "--device", "cuda:1", "--dtype", "bf16"]) == 0
    assert calls[-1] == {"dtype": "bf16", "device": "cuda:1"}
    monkeypatch.undo()
    if not torch_sees_cuda():
        assert cli.main(["info", folder, "--device", "cuda"]) == 2
        assert "not available" in capsys.readouterr().err


def torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_declines_unknown_tensors_and_bad_folders(hf_checkpoint_dir, tmp_path):
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    assert describe_from_headers(tmp_path / "missing") is None
    folder = tmp_path / "extra"
    shutil.copytree(hf_checkpoint_dir("llava"), folder)
    save_file({"something.else": np.zeros(3, np.float32)}, folder / "model.safetensors")
    assert describe_from_headers(folder) is None  # a name no rule places: describe() answers (or explains)


def test_info_command_never_imports_torch(hf_checkpoint_dir, monkeypatch):
    """`vlmkit info` of a folder and of the default model answers from headers, as describe() does on this
    machine (its real CPU flags): torch is never imported."""
    monkeypatch.setattr(hardware, "cpu_flags", REAL_FLAGS)
    targets = [hf_checkpoint_dir("llava")] + (["default"] if HAS_DEFAULT else [])
    for target in targets:
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "vlmkit", "info", target, "--json"],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout) == api.describe(target)
        if header_info.surely_cpu_only():  # elsewhere torch decides what "auto" is
            imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines()
                        if line.startswith("import time")}
            assert "torch" not in imported and "vlmkit.checkpoints.header_info" in imported
