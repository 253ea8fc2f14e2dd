"""The shared training loop: precision modes, checksummed checkpoints (corrupt ones refused, stale temp files removed),
a non-finite loss stopping the run (or skipped on request), strict JSON in metrics.jsonl."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlmkit.train.loop import TrainConfig, autocast, run


def _regression(precision: str) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
    x = torch.randn(64, 16)
    y = x[:, :1] * 2 - x[:, 1:2]
    cfg = TrainConfig(steps=40, batch_size=64, lr=1e-2, warmup=0.0, log_every=1000, precision=precision)
    return run(model, lambda step: {"x": x, "y": y}, lambda m, b: (m(b["x"]).float() - b["y"]).pow(2).mean(), cfg,
               log=lambda _: None)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_precision_trains(precision):
    losses = _regression(precision)
    assert losses[-1] < 0.3 * losses[0]


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_weights_float32():
    layer = nn.Linear(8, 8)
    with autocast(torch.device("cpu"), "bf16"):
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with autocast(torch.device("cpu"), "auto"):  # auto = float32 on a CPU without bf16 units (conftest's)
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_auto_precision_follows_the_cpu(monkeypatch):
    from vlmkit import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    with autocast(torch.device("cpu"), "auto"):
        assert nn.Linear(8, 8)(torch.randn(2, 8)).dtype == torch.bfloat16


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be"):
        autocast(torch.device("cpu"), "fp8")


# ------------------------------------------------------------------------------ corrupt checkpoints, NaN losses

def _tiny(steps: int, nan_at: int = -1, **kw):
    """A small regression whose batch of 0-based step `nan_at` holds a NaN (a corrupt example)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
    x = torch.randn(64, 16)
    y = x[:, :1] * 2 - x[:, 1:2]

    def batch(step):
        return {"x": x.clone().fill_(float("nan")) if step == nan_at else x, "y": y}

    cfg = TrainConfig(steps=steps, batch_size=64, lr=1e-2, warmup=0.0, log_every=1000, ckpt_every=1, **kw)
    return model, batch, lambda m, b: (m(b["x"]) - b["y"]).pow(2).mean(), cfg


def _finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    from vlmkit.train.checkpoint import load_checkpoint
    from vlmkit.train.loop import NonFiniteLossError

    model, batch, loss, cfg = _tiny(10, nan_at=5)
    with pytest.raises(NonFiniteLossError, match=r"step 6: the loss is nan.*--skip-nonfinite"):
        run(model, batch, loss, cfg, ckpt_path=tmp_path / "ck.safetensors", log=lambda _: None)
    assert _finite(model)  # the update of step 6 was not applied
    assert load_checkpoint(tmp_path / "ck.safetensors", model)[0] == 5  # the last good step's checkpoint


def test_skip_nonfinite_drops_the_bad_batch_and_trains_on(tmp_path):
    model, batch, loss, cfg = _tiny(30, nan_at=5, skip_nonfinite=True)
    lines = []
    losses = run(model, batch, loss, cfg, log=lines.append)
    assert len(losses) == 29 and all(math.isfinite(v) for v in losses) and losses[-1] < 0.3 * losses[0]
    assert _finite(model) and any("step 6" in line and "skipped (1 so far)" in line for line in lines)


def _flip(path, offset_from_data: int, n: int) -> None:
    """XOR `n` bytes of a safetensors file's tensor data (past its JSON header), as a bad disk would."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little") + offset_from_data
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    path.write_bytes(bytes(raw))


def test_a_corrupt_checkpoint_is_refused_on_resume(tmp_path):
    from vlmkit.train.checkpoint import CheckpointError

    ck = tmp_path / "ck.safetensors"
    model, batch, loss, cfg = _tiny(3)
    run(model, batch, loss, cfg, ckpt_path=ck, log=lambda _: None)
    _flip(ck, 100, 1024)
    model, batch, loss, cfg = _tiny(6)
    with pytest.raises(CheckpointError, match=rf"checkpoint {ck} is corrupt.*delete {ck}.*another --out"):
        run(model, batch, loss, cfg, ckpt_path=ck, log=lambda _: None)
    ck.write_bytes(ck.read_bytes()[:50])  # a header cut short: unreadable, said the same way
    with pytest.raises(CheckpointError, match=rf"checkpoint {ck} cannot be read.*delete {ck}"):
        run(model, batch, loss, cfg, ckpt_path=ck, log=lambda _: None)


def test_stale_temp_files_are_removed_and_resume_still_works(tmp_path):
    ck = tmp_path / "ck.safetensors"
    model, batch, loss, cfg = _tiny(3)
    run(model, batch, loss, cfg, ckpt_path=ck, log=lambda _: None)
    stale = tmp_path / ".ck.safetensors.x1y2z3.tmp"  # what a run killed mid-write leaves
    stale.write_bytes(b"partial")
    model, batch, loss, cfg = _tiny(5)
    lines = []
    assert len(run(model, batch, loss, cfg, ckpt_path=ck, log=lines.append)) == 2  # resumed at step 3
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]
    assert any("removed" in line for line in lines) and any("resumed" in line and "step 3" in line for line in lines)


def test_a_resumed_run_repeats_the_uninterrupted_one_exactly(tmp_path):
    """The checkpoint holds the RNG state too: dropout draws the same masks after a resume."""
    from vlmkit.train.metrics_log import read_losses

    def make(kill_at=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.3), nn.Linear(32, 1))
        x = torch.randn(64, 16)

        def batch(step):
            if step == kill_at:
                raise KeyboardInterrupt  # killed after the checkpoint of the step before
            return {"x": x + step, "y": x[:, :1]}

        cfg = TrainConfig(steps=6, batch_size=64, lr=1e-2, warmup=0.0, log_every=1000, ckpt_every=1)
        return model, batch, lambda m, b: (m(b["x"]) - b["y"]).pow(2).mean(), cfg

    model, batch, loss, cfg = make()
    straight = run(model, batch, loss, cfg, ckpt_path=tmp_path / "a.ck", metrics_path=tmp_path / "a.jsonl",
                   log=lambda _: None)
    assert list(read_losses(tmp_path / "a.jsonl").values()) == straight
    model, batch, loss, cfg = make(kill_at=3)
    with pytest.raises(KeyboardInterrupt):
        run(model, batch, loss, cfg, ckpt_path=tmp_path / "b.ck", metrics_path=tmp_path / "b.jsonl",
            log=lambda _: None)
    model, batch, loss, cfg = make()
    torch.manual_seed(123)  # another process, another RNG state: the checkpoint's replaces it
    resumed = run(model, batch, loss, cfg, ckpt_path=tmp_path / "b.ck", metrics_path=tmp_path / "b.jsonl",
                  log=lambda _: None)
    assert resumed == straight[3:] and read_losses(tmp_path / "b.jsonl") == read_losses(tmp_path / "a.jsonl")
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(tmp_path / "a.ck")).values(),
                                                   load_file(str(tmp_path / "b.ck")).values()))


def test_metrics_log_writes_strict_json_and_cleans_up_on_resume(tmp_path):
    from vlmkit.train.metrics_log import MetricsLog, read_losses

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": NaN, "eval": {"acc": Infinity}}\n'
                    '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')  # older bare NaN, a step past the checkpoint, torn
    log = MetricsLog(path, resume_step=2, enabled=True)
    log.write({"step": 3, "loss": float("inf"), "grad_norm": float("nan"), "eval": {"acc": [0.5, float("-inf")]}})

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))

    records = [strict(line) for line in path.read_text().splitlines()]
    assert records == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": None, "eval": {"acc": None}},
                       {"step": 3, "loss": None, "grad_norm": None, "eval": {"acc": [0.5, None]}}]
    assert read_losses(path) == {1: 2.5}
