"""The device ("auto" and explicit, checked before any weight is read) and the compute dtype chosen from the
hardware, with CPU flags and accelerator availability monkeypatched (this machine has neither)."""

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit import api, hardware
from vlmkit.hardware import compute_dtype, resolve_device

READ_FLAGS = hardware.cpu_flags  # taken at import, before conftest's session patch


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_mps_available", lambda: False)


def _cpu(monkeypatch, *flags):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))


# ------------------------------------------------------------------------------------------------ dtype

@pytest.mark.parametrize("flags, expected", [
    (("avx2", "fma"), torch.float32), (("avx512f", "avx512_vnni"), torch.float32),
    (("avx512_bf16",), torch.bfloat16), (("amx_bf16", "amx_tile"), torch.bfloat16)])
def test_cpu_dtype_follows_the_bf16_units(monkeypatch, flags, expected):
    _cpu(monkeypatch, *flags)
    assert compute_dtype(torch.device("cpu")) == expected
    assert compute_dtype("cpu") == expected


def test_requested_dtype_overrides_and_bad_ones_are_named(monkeypatch):
    _cpu(monkeypatch)
    assert compute_dtype("cpu", "bf16") == torch.bfloat16 and compute_dtype("cpu", torch.float16) == torch.float16
    _cpu(monkeypatch, "amx_bf16")
    assert compute_dtype("cpu", "float32") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        compute_dtype("cpu", "int8")
    with pytest.raises(ValueError, match="unknown dtype"):
        compute_dtype("cpu", torch.int8)


def test_gpu_dtypes(monkeypatch):
    _cpu(monkeypatch)
    assert compute_dtype(torch.device("mps")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype(torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert compute_dtype(torch.device("cuda", 0)) == torch.float16


def test_cpu_flags_reads_this_machine():
    flags = READ_FLAGS()  # the real reader (conftest patches `cpu_flags` for the suite)
    assert isinstance(flags, frozenset)
    if Path("/proc/cpuinfo").is_file() and platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in flags


# ------------------------------------------------------------------------------------------------ device

def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, no_accelerator):
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(hardware, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    assert resolve_device(None) == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device 'cuda:2' is not available here \(only 2 GPU\(s\)\); "
                                         r"available: cpu, cuda:0, cuda:1, mps"):
        resolve_device("cuda:2")


def test_unavailable_and_unknown_devices_are_named(no_accelerator):
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'cuda' is not available here \(.*\); available: cpu$"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"device 'mps' is not available here .* available: cpu"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="device 'meta' is not available"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.fixture
def loaders_must_not_run(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a loader ran: the check came too late")
    for name in ("load_model", "load_quantized", "load_adapter_model"):
        monkeypatch.setattr(api, name, never)


@pytest.mark.parametrize("device", ["cuda", "mps", "cuda:3", "tpu"])
def test_a_wrong_device_fails_before_any_weight_is_read(device, no_accelerator, loaders_must_not_run):
    with pytest.raises(ValueError, match="not available here|unknown device"):
        vlmkit.load("default", device=device)
    with pytest.raises(ValueError, match="not available here|unknown device"):
        vlmkit.load("/no/such/folder", device=device)  # the device is checked first of all


def test_int4_on_cuda_goes_to_the_loader(monkeypatch, hf_checkpoint_dir, loaders_must_not_run):
    monkeypatch.setattr(api, "resolve_device", lambda spec: torch.device("cuda", 0))
    monkeypatch.setattr(api, "compute_dtype", lambda dev, requested: torch.bfloat16)
    with pytest.raises(AssertionError, match="a loader ran"):  # not refused: CUDA has int4 kernels (quant_cuda)
        vlmkit.load(hf_checkpoint_dir("llava"), quantize="int4")


def test_cli_device_flag_reports_an_unavailable_device(no_accelerator, capsys):
    from vlmkit.cli import main
    assert main(["info", "default", "--device", "cuda"]) == 2
    assert "device 'cuda' is not available here" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ loading

@pytest.fixture(scope="module")
def bf16_folder(hf_checkpoint_dir, tmp_path_factory):
    """The tiny LLaVA checkpoint stored in bf16, as real checkpoints are."""
    src = hf_checkpoint_dir("llava")
    out = tmp_path_factory.mktemp("llava-bf16")
    shutil.copytree(src, out, dirs_exist_ok=True)
    for path in out.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path).items()},
                  path, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config))
    return out


def _float_dtypes(model, prefix: str) -> set:
    tensors = [t for n, t in model.state_dict().items() if n.startswith(prefix) and t.is_floating_point()]
    return {t.dtype for t in tensors if t.numel()}


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_float_parts_compute_in_the_dtype_of_the_hardware(monkeypatch, no_accelerator, bf16_folder, quantize):
    _cpu(monkeypatch, "avx2", "fma")  # no bf16 units: the bf16 checkpoint computes in float32
    m = vlmkit.load(bf16_folder, quantize=quantize, caches=False)
    kinds = (m.quantization or {}).get("modules", {})
    assert m.model.device == torch.device("cpu") and m.info()["dtype"] == "float32" and m.info()["device"] == "cpu"
    for part in ("vision.", "connector.", "text.norm"):
        assert _float_dtypes(m.model, part) == {torch.float32}, part
    batch = m.processor(["<image>\nWhat is it?"], [[api_image()]])
    with torch.no_grad():
        assert m.model(**batch).logits.dtype == torch.float32
    if quantize:
        assert kinds["text.layers.0.attn.q_proj"] == quantize
    _cpu(monkeypatch, "amx_bf16")  # bf16 units: bf16
    m = vlmkit.load(bf16_folder, quantize=quantize, caches=False)
    assert _float_dtypes(m.model, "vision.") == {torch.bfloat16} and m.info()["dtype"] == "bfloat16"
    m = vlmkit.load(bf16_folder, quantize=quantize, dtype="fp32", caches=False)  # dtype= overrides
    assert _float_dtypes(m.model, "connector.") == {torch.float32}


def api_image():
    from PIL import Image
    return Image.new("RGB", (42, 42), (200, 30, 30))
