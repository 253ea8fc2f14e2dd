"""`vlmkit.api.describe`: `load(...).info()` from the config alone -- the same dict, without reading a weight."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vlmkit
from hf_fixtures import FAMILIES
from vlmkit import api, cli
from vlmkit.checkpoints import adapter, gguf, hf


def refuse(*args, **kwargs):
    raise AssertionError("describe read weights")


def described(path, **kwargs) -> dict:
    """api.describe with every way a weight is read (safetensors shards, the adapter file, the GGUF) raising."""
    with pytest.MonkeyPatch.context() as mp:
        for module, name in ((hf, "safe_open"), (adapter, "load_file"), (gguf, "open_gguf")):
            mp.setattr(module, name, refuse)
        return api.describe(path, **kwargs)


def test_default_model_as_loaded():
    if not (api.default_model_path() / "config.json").is_file():
        pytest.skip("the embedded default model is not installed")
    expected = vlmkit.load("default").info()
    assert described("default") == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_checkpoint_as_loaded(hf_checkpoint_dir, family):
    folder = hf_checkpoint_dir(family)
    expected = vlmkit.load(folder).info()
    assert described(folder) == expected


def test_dtype_is_reported_as_asked(hf_checkpoint_dir):
    info = described(hf_checkpoint_dir("llava"), dtype="bfloat16")
    assert info["dtype"] == "bfloat16" and info["memory_bytes"] == 2 * info["parameters"]
    assert info["device"] == "cpu" and info["quantization"] is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_quantized_folder_from_its_config(hf_checkpoint_dir, tmp_path, mode):
    m = vlmkit.load(hf_checkpoint_dir("llava"), quantize=mode)
    vlmkit.save(m, tmp_path / "q")
    info = described(tmp_path / "q")
    assert info == vlmkit.load(tmp_path / "q").info()
    assert info["quantization"] == mode


def without_weights(folder, dest):
    """A copy of `folder` holding only its small files (config, tokenizer, processor): no tensor data at all."""
    dest.mkdir()
    for f in Path(folder).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".gguf"):
            shutil.copyfile(f, dest / f.name)
    return dest


def test_info_command_needs_no_weight_file(hf_checkpoint_dir, tmp_path, capsys):
    """Structural: `vlmkit info` of a folder whose weight files are gone says what the full folder's does."""
    folder = Path(hf_checkpoint_dir("llava"))
    vlmkit.save(vlmkit.load(folder, quantize="int4"), tmp_path / "q")
    cases = [(folder, without_weights(folder, tmp_path / "bare")),
             (tmp_path / "q", without_weights(tmp_path / "q", tmp_path / "bare-q"))]
    if (api.default_model_path() / "config.json").is_file():
        cases.append((api.default_model_path(), without_weights(api.default_model_path(), tmp_path / "bare-default")))
    for full, bare in cases:
        assert cli.main(["info", str(full), "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)
        assert cli.main(["info", str(bare), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {**expected, "folder": str(bare)}


def test_describe_imports_no_compiler(hf_checkpoint_dir, tmp_path):
    """Meta models (quantized layers included) are built without torch's Python reference ops, whose first use
    imports sympy and torch._dynamo (~1-2 s of every `vlmkit info` and load)."""
    vlmkit.save(vlmkit.load(hf_checkpoint_dir("llava"), quantize="int4"), tmp_path / "q")
    folders = [str(tmp_path / "q"), hf_checkpoint_dir("llava")]
    if (api.default_model_path() / "config.json").is_file():
        folders.append("default")
    code = (f"import sys, vlmkit.api as a; [a.describe(f) for f in {folders!r}]; "
            "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent).stdout
    assert out.strip() == "[]"


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        api.describe(tmp_path / "missing")
    with pytest.raises(ValueError, match="device"):
        api.describe("default", device="nonsense")
