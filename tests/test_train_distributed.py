"""Scale without changing the result: 2 processes (torchrun, gloo, DDP and FSDP2) reach the weights of 1 process on
the same global batch; gradient accumulation and gradient checkpointing leave the update as it is; a run killed and
resumed gives exactly the loss curve (and weights) of an uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.train.checkpoint import atomic_save
from vlmkit.train.finetune import CHECKPOINT, METRICS, FinetuneConfig, finetune
from vlmkit.train.metrics_log import read_losses

DATA = Path(__file__).parent / "data" / "train"
REPO = Path(__file__).parent.parent


def config(folder, out, **kw) -> FinetuneConfig:
    base = dict(model=folder, data=[str(DATA / "llava.json"), str(DATA / "captions.jsonl")], stage="lora",
                out=str(out), batch_size=4, steps=3, lr=1e-2, lora_r=4, lora_alpha=8.0, log_every=100,
                save_final=False, precision="fp32")  # exact comparisons: no bf16 autocast on CPUs with bf16 units
    base.update(kw)
    return FinetuneConfig(**base)


def params(out) -> dict:
    return {k: v for k, v in load_file(str(Path(out) / CHECKPOINT)).items() if k.startswith("param/")}


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def one_process(hf_checkpoint_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    folder = hf_checkpoint_dir("llava")
    result = finetune(config(folder, out), log=lambda _: None)
    return folder, out, result


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_reach_the_weights_of_one(one_process, tmp_path, strategy):
    """torchrun, gloo: the same global batch of 4 split over 2 processes and 2 micro-batches each."""
    folder, one_out, one = one_process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vlmkit", "train", "--model", folder, "--data", str(DATA / "llava.json"),
           "--data", str(DATA / "captions.jsonl"), "--stage", "lora", "--lora-r", "4", "--lora-alpha", "8",
           "--batch-size", "4", "--steps", "3", "--lr", "1e-2", "--log-every", "100", "--no-final",
           "--micro-batch-size", "1", "--strategy", strategy, "--precision", "fp32", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 processes x 2 accumulated micro-batches of 1; the text-only example (#5, step 1) sits alone in one of them,
    # which FSDP must still run through the vision tower (a stand-in image row with no labels)
    assert "2 process(es) x 2 micro-batch(es) of 1" in proc.stderr
    # the peft adapter (written with --no-final too) holds the trained tensors, gathered from the shards under FSDP
    adapter, trained = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")), params(tmp_path)
    assert len(adapter) == len(trained)
    key = "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_B.weight"
    assert torch.equal(adapter[key], trained["param/text.layers.1.attn.v_proj.lora_B"])
    # equal up to the order of float sums (Adam can turn a 1e-9 gradient difference into 1e-5): 1% of one step
    assert_same_weights(params(one_out), params(tmp_path), atol=1e-4)
    two = read_losses(tmp_path / METRICS)
    assert two.keys() == one["losses"].keys()
    for step, loss in one["losses"].items():
        assert two[step] == pytest.approx(loss, rel=1e-6)


def test_gradient_accumulation_and_checkpointing_keep_the_update(one_process, tmp_path):
    folder, one_out, one = one_process
    reference = params(one_out)
    accumulated = finetune(config(folder, tmp_path / "acc", micro_batch_size=1), log=lambda _: None)
    assert_same_weights(reference, params(tmp_path / "acc"), atol=1e-4)
    checkpointed = finetune(config(folder, tmp_path / "ckpt", micro_batch_size=2, gradient_checkpointing=True),
                            log=lambda _: None)
    assert_same_weights(reference, params(tmp_path / "ckpt"), atol=1e-4)
    for step, loss in one["losses"].items():
        assert accumulated["losses"][step] == pytest.approx(loss, rel=1e-6)
        assert checkpointed["losses"][step] == pytest.approx(loss, rel=1e-6)


class Killed(Exception):
    pass


def test_killed_and_resumed_run_repeats_the_uninterrupted_loss_curve(hf_checkpoint_dir, tmp_path):
    folder = hf_checkpoint_dir("llava")
    cfg = config(folder, tmp_path / "straight", steps=7, ckpt_every=2, group_by_length=True, micro_batch_size=2)
    straight = finetune(cfg, log=lambda _: None)["losses"]

    def kill_after_step_5(step, loss):
        if step == 5:  # after the checkpoint of step 4: step 5 is lost and must be redone identically
            raise Killed

    interrupted = replace(cfg, out=str(tmp_path / "resumed"))
    with pytest.raises(Killed):
        finetune(interrupted, log=lambda _: None, on_step=kill_after_step_5)
    assert read_losses(tmp_path / "resumed" / METRICS).keys() == {1, 2, 3, 4, 5}
    lines = []
    resumed = finetune(interrupted, log=lines.append)
    assert any("resumed from" in line and "at step 4" in line for line in lines)
    assert sorted(resumed["losses"]) == [5, 6, 7]
    assert read_losses(tmp_path / "resumed" / METRICS) == straight  # exactly, the data order included
    assert_same_weights(params(tmp_path / "straight"), params(tmp_path / "resumed"), atol=0)
    # A checkpoint from another data set / batch size is refused rather than silently mixed in.
    with pytest.raises(ValueError, match="different data or settings"):
        finetune(replace(interrupted, batch_size=2), log=lambda _: None)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.safetensors"
    atomic_save(path, {"a": torch.zeros(2)}, {"step": "1"})
    import vlmkit.train.checkpoint as checkpoint

    def torn_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(checkpoint, "save_file", torn_write)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(path, {"a": torch.ones(2)}, {"step": "2"})
    assert torch.equal(load_file(str(path))["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temp file left behind


def test_bf16_autocast_keeps_float32_weights_and_close_losses(one_process, tmp_path):
    folder, _, one = one_process
    bf16 = finetune(config(folder, tmp_path, precision="bf16", steps=1), log=lambda _: None)
    assert bf16["losses"][1] == pytest.approx(one["losses"][1], rel=2e-2)
    assert {v.dtype for v in params(tmp_path).values()} == {torch.float32}  # master weights stay float32
