"""`vlmkit quantize`: the folder it writes loads back equal to quantizing at load; every bad input one clear line.
Also the row-block quantization it (and every quantized load) goes through: equal to quantizing whole."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import vlmkit
from hf_fixtures import sample_images
from vlmkit import cli
from vlmkit.models import quant

A, _ = sample_images()
PROMPT = "<image>What is shown?"


@pytest.fixture(scope="module")
def folder(hf_checkpoint_dir):
    return hf_checkpoint_dir("llava")


def _logits(m):
    batch = m.processor([PROMPT], [[A]])
    with torch.no_grad():
        return m.model(**batch).logits[0, -8:]


@pytest.mark.parametrize("flag", ["--int4", "--int8"])
def test_written_folder_loads_back_equal_to_quantize_at_load(folder, tmp_path, capsys, flag):
    dst = tmp_path / "q"
    assert cli.main(["quantize", folder, str(dst), flag]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["mode"] == flag[2:]
    assert (dst / "tokenizer.json").is_file() or (dst / "tokenizer_config.json").is_file()
    saved, at_load = vlmkit.load(dst, caches=False), vlmkit.load(folder, quantize=flag[2:], caches=False)
    assert saved.quantization == at_load.quantization
    assert torch.equal(_logits(saved), _logits(at_load))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_group_size_is_used(folder, tmp_path):
    assert cli.main(["quantize", folder, str(tmp_path / "q"), "--int4", "--group-size", "64"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["group_size"] == 64


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmkit: error:") and err.count("\n") == 1
    return err


def test_errors(folder, tmp_path, capsys):
    dst = str(tmp_path / "out")
    assert "does not exist" in _error(capsys, ["quantize", str(tmp_path / "nope"), dst, "--int4"])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(capsys, ["quantize", str(tmp_path / "empty"), dst, "--int4"])
    assert "--int4 or --int8" in _error(capsys, ["quantize", folder, dst])
    assert "--group-size" in _error(capsys, ["quantize", folder, dst, "--int4", "--group-size", "48"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not an empty folder" in _error(capsys, ["quantize", folder, str(tmp_path / "full"), "--int4"])
    assert "parent folder does not exist" in _error(capsys, ["quantize", folder, str(tmp_path / "a" / "b"), "--int8"])
    # an architecture vlmkit does not know
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FooForCausalLM"], "foo"
    (odd / "config.json").write_text(json.dumps(config))
    assert "Foo" in _error(capsys, ["quantize", str(odd), dst, "--int4"])
    # already quantized: say so rather than quantize twice
    assert cli.main(["quantize", folder, str(tmp_path / "q8"), "--int8"]) == 0
    capsys.readouterr()
    assert "already saved int8" in _error(capsys, ["quantize", str(tmp_path / "q8"), dst, "--int4"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cast", [None, torch.bfloat16, torch.float16])
def test_row_blocks_equal_quantizing_whole(monkeypatch, cast):
    torch.manual_seed(0)
    w = torch.randn(100, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows a block: the last block is short
    q8, s8 = quant.quantize_int8(w, cast)
    q4, s4, m4 = quant.quantize_int4(w, 32, cast)
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 1 << 30)
    whole = w.to(cast) if cast is not None else w
    for a, b in zip((q8, s8, q4, s4, m4), (*quant.quantize_int8(whole), *quant.quantize_int4(whole, 32))):
        assert a.dtype == b.dtype and torch.equal(a, b)
    module = quant.make_module("embed8", w, dtype=torch.float32)
    assert torch.equal(module.qweight, q8) and module.weight.dtype == torch.float32
