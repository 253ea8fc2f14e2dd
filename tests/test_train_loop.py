"""The shared training loop's precision modes."""

from __future__ import annotations

import pytest
import torch
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
    with autocast(torch.device("cpu"), "auto"):  # auto = float32 on the CPU
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be"):
        autocast(torch.device("cpu"), "fp8")
