"""The model load's progress bar: bytes of the checkpoint read / total on stderr, drawn by build_model for every
kind of folder; on when asked, off when asked, and in auto mode only on a terminal without VLMKIT_NO_PROGRESS."""

import io
import re
from types import SimpleNamespace

import pytest

import vlmkit
from vlmkit import api
from vlmkit.checkpoints import builder
from vlmkit.checkpoints.folder_config import WEIGHTS, safetensors_header
from vlmkit.checkpoints.hf import SafetensorsSource
from vlmkit.cli.common import load_progress
from vlmkit.models.meta import shapes_only
from vlmkit.models.vlm import VLMModel

# tqdm's last frame, e.g. "Loading weights: 100%|██████████| 1.23MB/1.23MB [00:00<00:00, 9.87MB/s]"
FULL_BAR = re.compile(r"100%\|[^|]*\| ([\d.]+[kMG]?)B/([\d.]+[kMG]?)B \[")


def final_frame(err: str, desc: str) -> re.Match:
    frames = [f for f in re.split(r"[\r\n]", err) if f.startswith(desc + ":")]
    assert frames, err
    match = FULL_BAR.search(frames[-1])
    assert match and match.group(1) == match.group(2), frames[-1]  # bytes read == total
    return match


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_shows_the_bytes_read(hf_checkpoint_dir, capsys):
    folder = hf_checkpoint_dir("llava")
    vlmkit.load(folder, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""  # stderr only: `vlmkit run --json` keeps stdout to its JSON
    final_frame(captured.err, "Loading weights")
    vlmkit.load(folder, quantize="int8", progress=True)
    final_frame(capsys.readouterr().err, "Loading and quantizing weights")


def test_total_is_the_checkpoint_data(hf_checkpoint_dir):
    """The bar's total: every byte of tensor data in the file (header excluded), read from the header alone."""
    folder = hf_checkpoint_dir("llava")
    source = SafetensorsSource(folder)
    with shapes_only():
        expected = VLMModel(source.cfg).state_dict()
    total = sum(source.nbytes(name) for name in source.keys(expected))
    header = safetensors_header(f"{folder}/{WEIGHTS}")
    data = max(v["data_offsets"][1] for v in header.values())
    ignored = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                  if k.endswith(("rotary_emb.inv_freq", "position_ids")))
    assert total == data - ignored


def test_default_model_bar(capsys):
    if not (api.default_model_path() / "config.json").is_file():
        pytest.skip("the embedded default model is not installed")
    vlmkit.load("default", progress=True)
    total = final_frame(capsys.readouterr().err, "Loading weights").group(2)
    assert total.endswith("M") and float(total[:-1]) > 50  # the GGUF's ~93 MB and the adapter's ~11 MB


def test_silent_unless_asked_or_on_a_terminal(hf_checkpoint_dir, capsys, monkeypatch):
    folder = hf_checkpoint_dir("llava")
    vlmkit.load(folder)  # auto; pytest's stderr is no terminal
    vlmkit.load(folder, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv(builder.NO_PROGRESS_ENV, raising=False)
    monkeypatch.setattr("sys.stderr", Terminal())
    assert builder.progress_enabled(None) and not builder.progress_enabled(False)
    for value, shown in (("1", False), ("true", False), ("0", True), ("", True)):
        monkeypatch.setenv(builder.NO_PROGRESS_ENV, value)
        assert builder.progress_enabled(None) is shown
    assert builder.progress_enabled(True)  # asked for: shown whatever the environment says


def test_cli_quiet_log_levels_hide_the_bar():
    assert load_progress(SimpleNamespace(log_level=None)) is None  # auto
    assert load_progress(SimpleNamespace(log_level="info")) is None
    assert load_progress(SimpleNamespace(log_level="error")) is False
    assert load_progress(SimpleNamespace(log_level="critical")) is False
