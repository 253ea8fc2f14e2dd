"""`vlmkit.api.describe`: `load(...).info()` from the config alone -- the same dict, without reading a weight."""

import pytest

import vlmkit
from hf_fixtures import FAMILIES
from vlmkit import api
from vlmkit.checkpoints import adapter, gguf, hf


def refuse(*args, **kwargs):
    raise AssertionError("describe read weights")


def described(path, **kwargs) -> dict:
    """api.describe with every way a weight is read (safetensors shards, the adapter file, the GGUF) raising."""
    with pytest.MonkeyPatch.context() as mp:
        for module, name in ((hf, "safe_open"), (adapter, "load_file"), (adapter, "open_gguf"),
                             (gguf, "open_gguf")):
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


def test_saved_quantized_folder_is_loaded(hf_checkpoint_dir, tmp_path):
    m = vlmkit.load(hf_checkpoint_dir("llava"), quantize="int8")
    vlmkit.save(m, tmp_path / "q")
    info = api.describe(tmp_path / "q")
    assert info == vlmkit.load(tmp_path / "q").info()
    assert info["quantization"] == "int8"


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        api.describe(tmp_path / "missing")
    with pytest.raises(ValueError, match="device"):
        api.describe("default", device="nonsense")
