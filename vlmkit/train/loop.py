"""The training loop, for every run (`vlmkit train`'s fine-tuning and the recipes): AdamW, warmup + cosine,
micro-batch accumulation, DDP / FSDP (distributed.py), autocast, gradient clipping, a progress line (loss,
samples/s, ETA), metrics.jsonl (metrics_log.py), atomic, checksummed, resumable checkpoints (checkpoint.py), and a
stop with an error naming the step when the loss or the gradient is not finite.

    losses = run(model, make_batch, loss_fn, TrainConfig(steps=100, lr=1e-3), ckpt_path="run/ck.safetensors")
    loop = Loop(wrapped, groups, cfg, ctx, ckpt_path, fingerprint=...)      # what `run` and finetune.py build on
    loop.resume(); loop.run(lambda step: StepBatch(micro_batches, divisor=tokens), loss_fn, metrics)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..hardware import cpu_has_native_bf16
from . import distributed as D
from .checkpoint import load_checkpoint, remove_stale_temps, save_checkpoint
from .metrics_log import MetricsLog

__all__ = ["TrainConfig", "Loop", "StepBatch", "run", "lr_at", "autocast", "NonFiniteLossError", "check_finite",
           "Progress", "trainable", "enable_gradient_checkpointing"]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: float = 0.03  # fraction of steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 10
    ckpt_every: int = 100
    seed: int = 0
    precision: str = "auto"  # see autocast(): auto (bf16 where the hardware has bf16 units) | bf16 | fp32 | fp16
    skip_nonfinite: bool = False  # a NaN / inf loss skips its batch (counted) instead of stopping the run
    betas: tuple = (0.9, 0.98)  # AdamW's


class NonFiniteLossError(ValueError):
    """The loss (or gradient norm) of a step is NaN or infinite; raised before that step updates the weights."""


def check_finite(step: int, loss: float, grad_norm: Optional[float] = None, skip: bool = False) -> bool:
    """True when the step's loss (and gradient norm, if given) are finite numbers. Otherwise False when `skip`
    (the caller drops the batch), else NonFiniteLossError naming the step (1-based, as in the logs)."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return True
    if skip:
        return False
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    raise NonFiniteLossError(
        f"training stopped at step {step}: {what}, so its update was not applied and nothing more was saved. "
        f"Lower the learning rate (--lr), check the data of that step, or pass --skip-nonfinite to skip such "
        f"batches")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine down to min_lr_ratio * lr."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision mode: "auto" = bf16 on a GPU and on a CPU with bf16 matrix units,
    float32 on other CPUs (bf16 is emulated there, several times slower); "bf16"; "fp32"; "fp16" (GPUs only; the
    caller adds a GradScaler)."""
    if precision not in ("auto", "bf16", "fp32", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a GPU; use bf16 on the CPU")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def trainable(model: nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Progress:
    """One line per log interval: step, loss (running mean), samples/s, ETA."""

    def __init__(self, total: int, batch_size: int, start: int, label: str = ""):
        self.total, self.batch, self.start, self.label = total, batch_size, start, label
        self.t0, self.losses = time.time(), []

    def update(self, step: int, loss: float, lr: float) -> str:
        self.losses.append(loss)
        done = step + 1 - self.start
        elapsed = time.time() - self.t0
        rate = done * self.batch / max(elapsed, 1e-9)
        eta = (self.total - step - 1) * self.batch / max(rate, 1e-9)
        mean = sum(self.losses[-50:]) / len(self.losses[-50:])
        bar = "#" * int(20 * (step + 1) / self.total)
        return (f"{self.label} [{bar:<20}] {step + 1}/{self.total} loss {mean:.4f} lr {lr:.2e} "
                f"{rate:.1f} samples/s ETA {eta / 60:.1f} min")


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@dataclass
class StepBatch:
    """What one optimizer step trains on: micro-batches whose gradients add up (one forward/backward each), and the
    number the summed loss is divided by, summed over all processes (1 when `loss_fn` already returns a mean).
    `record`: more fields for the step's metrics line; `counts`: numbers added to the run's counters (kept in the
    checkpoint, so they survive a resume)."""

    micro: list
    divisor: float = 1.0
    record: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)


class Loop:
    """The one training loop: AdamW over `groups` (each may carry an "lr_scale" and its own "weight_decay"), warmup +
    cosine (`lr_at`), micro-batch accumulation (DDP syncs on the last micro-batch only), autocast (+ a GradScaler for
    fp16), gradient clipping, a non-finite loss or gradient stopping the run (or skipped with `skip_nonfinite`),
    a progress line, one metrics.jsonl line per step, and a checkpoint every `ckpt_every` steps and at the end.

    `model` is what the loss runs through (DDP / FSDP wrapped or not, see distributed.py). Batch i is
    `make_batch(i)`, so a run resumed at step k (`resume()`) reads exactly the data it would have; the checkpoint
    also holds the RNG state, so the resumed steps repeat the uninterrupted ones. `fingerprint` (JSON) is stored
    with each checkpoint and a resume whose fingerprint differs is refused; `extra` is stored as is."""

    def __init__(self, model: nn.Module, groups: list, cfg: TrainConfig, ctx: Optional[D.DistContext] = None,
                 ckpt_path: Optional[Path] = None, label: str = "", log: Optional[Callable[[str], None]] = None,
                 fingerprint: Optional[dict] = None, extra: Optional[dict] = None, counters: Sequence[str] = ()):
        self.model, self.cfg, self.label = model, cfg, label
        self.ctx = ctx or D.DistContext(device=next(model.parameters()).device)
        self.ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.fingerprint, self.extra = fingerprint, dict(extra or {})
        self.counters = {name: 0 for name in counters}
        self.nonfinite, self.start, self.samples_per_s = 0, 0, 0.0
        for g in groups:
            g.setdefault("lr_scale", 1.0)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
        self.params = [p for g in groups for p in g["params"]]
        autocast(self.ctx.device, cfg.precision)  # refuses an unknown mode before any step
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    def say(self, line: str) -> None:
        if self.ctx.is_main:
            self.log(f"{self.label} {line}" if self.label else line)

    def resume(self) -> int:
        """Remove the temp files of an interrupted checkpoint write; load the checkpoint if there is one. Returns
        the step to start at."""
        if self.ckpt_path is None:
            return 0
        if self.ctx.is_main:
            for stale in remove_stale_temps(self.ckpt_path):
                self.say(f"removed {stale}, the temp file of a checkpoint write that was cut short")
        self.ctx.barrier()
        if self.ckpt_path.is_file():
            self.start, extra = load_checkpoint(self.ckpt_path, self.model, self.optimizer, check=self._check,
                                                restore_rng=True, log=self.say)
            for name in self.counters:
                self.counters[name] = int(extra.get(name, 0))
            self.nonfinite = int(extra.get("skipped_nonfinite", 0))
            self.say(f"resumed from {self.ckpt_path} at step {self.start}")
        return self.start

    def _check(self, extra: dict) -> None:
        if self.fingerprint is None:
            return
        stored = extra.get("data", {})
        differs = [f"{k} {stored[k]} (now {self.fingerprint.get(k)})" if k != "content" else
                   "the data's content (other text or images)"
                   for k in stored if stored[k] != self.fingerprint.get(k)]
        if differs:
            raise ValueError(f"{self.ckpt_path} was written by a run with different data or settings: "
                             f"{'; '.join(differs)}; use another --out, or delete the checkpoint to start over")
        if "content" not in stored:
            self.say(f"warning: {self.ckpt_path} does not record its data's content (written by an older vlmkit); "
                     f"not verified")

    def save(self, step: int) -> None:
        extra = dict(self.extra, **self.counters, skipped_nonfinite=self.nonfinite)
        if self.fingerprint is not None:
            extra["data"] = self.fingerprint
        save_checkpoint(self.ckpt_path, self.model, self.optimizer, step, extra, self.ctx)

    def run(self, make_batch: Callable[[int], StepBatch], loss_fn: Callable[[nn.Module, dict], torch.Tensor],
            metrics: Optional[MetricsLog] = None, after_step: Optional[Callable[[int, float], None]] = None) -> dict:
        """Steps `start`..cfg.steps; returns {step (1-based): loss} of the steps whose update was applied.
        `after_step(step, loss)` runs after each step's checkpoint (periodic evaluation, callbacks)."""
        cfg = self.cfg
        progress, losses = Progress(cfg.steps, cfg.batch_size, self.start, self.label), {}
        t0, done = time.time(), 0
        self.model.train()
        for step in range(self.start, cfg.steps):
            lr = lr_at(step, cfg)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            batch = make_batch(step)
            for name, n in batch.counts.items():
                self.counters[name] = self.counters.get(name, 0) + n
            loss, norm, applied = self._step(batch, loss_fn, step + 1)
            done += 1
            elapsed = time.time() - t0
            self.samples_per_s = done * cfg.batch_size / max(elapsed, 1e-9)
            if applied:
                losses[step + 1] = loss
            else:
                self.nonfinite += 1
                self.say(f"step {step + 1}: the loss ({loss}) or gradient norm ({norm}) is not finite; batch "
                         f"skipped ({self.nonfinite} so far)")
            if metrics is not None:
                metrics.write({"step": step + 1, "loss": loss, "lr": lr, "samples": cfg.batch_size, **batch.record,
                               "grad_norm": norm, "samples_per_s": round(self.samples_per_s, 3),
                               "elapsed_s": round(elapsed, 3), **self.counters, "skipped_nonfinite": self.nonfinite})
            if applied and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                if self.ctx.is_main:
                    self.log(progress.update(step, loss, lr))
            elif applied:
                progress.losses.append(loss)
            if self.ckpt_path is not None and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
                self.save(step + 1)
            if after_step is not None:
                after_step(step + 1, loss)
        self.model.eval()
        return losses

    def _step(self, batch: StepBatch, loss_fn, step: int) -> tuple[float, float, bool]:
        """Forward/backward every micro-batch (gradients add up), clip, step. Returns (the loss of the global batch,
        the gradient norm before clipping, whether the update was applied). A non-finite loss (or, without a
        GradScaler, which skips those itself, gradient norm) raises NonFiniteLossError, or with `skip_nonfinite`
        leaves the weights as they are; both numbers are the same in every process, so all decide alike."""
        ctx, optimizer, scaler = self.ctx, self.optimizer, self.scaler
        loss_sum, divisor = 0.0, max(batch.divisor, 1.0)
        for k, micro in enumerate(batch.micro):
            micro = to_device(micro, ctx.device)
            with D.accumulation_context(self.model, k == len(batch.micro) - 1), autocast(ctx.device,
                                                                                           self.cfg.precision):
                part = loss_fn(self.model, micro)
            scaled = part * (ctx.world / divisor)  # DDP / FSDP average the gradients over processes: undo it
            (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += float(part.detach())
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        loss = ctx.sum(loss_sum) / divisor
        applied = check_finite(step, loss, None if scaler else norm, skip=self.cfg.skip_nonfinite)
        if applied and scaler:
            scaler.step(optimizer)
        elif applied:
            optimizer.step()
        if scaler:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss, norm, applied


def run(model: nn.Module, make_batch: Callable[[int], dict], loss_fn: Callable[[nn.Module, dict], torch.Tensor],
        cfg: TrainConfig, ckpt_path: Optional[Path] = None, label: str = "", log=None,
        param_groups: Optional[list] = None, metrics_path: Optional[Path] = None) -> list[float]:
    """Train for cfg.steps on one process, one batch per step (`make_batch(i)` -> a dict for `loss_fn`, which
    returns the mean loss); resumes from `ckpt_path` when it holds a checkpoint. Returns the loss of every step
    run in this call (skipped non-finite ones left out)."""
    loop = Loop(model, param_groups or [{"params": list(trainable(model).values())}], cfg, ckpt_path=ckpt_path,
                label=label, log=log, extra={"config": asdict(cfg)})
    start = loop.resume()
    metrics = MetricsLog(Path(metrics_path), start, True) if metrics_path is not None else None
    return list(loop.run(lambda step: StepBatch([make_batch(step)]), loss_fn, metrics).values())


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each ViT and decoder layer in the backward pass instead of keeping its activations (memory for
    compute). Done per instance, so the model classes stay as they are; returns how many layers it wraps."""
    from torch.utils.checkpoint import checkpoint

    count = 0
    for stack in (getattr(model, "vision", None), getattr(model, "text", None)):
        for layer in getattr(stack, "layers", []) if stack is not None else []:
            if getattr(layer, "_checkpointed", False):
                continue
            inner = layer.forward

            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():  # eval / generation: nothing to save memory for
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            layer.forward, layer._checkpointed = forward, True
            count += 1
    return count
