"""A small training loop: AdamW, warmup + cosine, gradient clipping, a progress line (loss, samples/s, ETA),
atomic, checksummed, resumable checkpoints in safetensors (trainable weights + optimizer moments + step; see
checkpoint.py), and a stop with an error naming the step when the loss or the gradient is not finite."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import atomic_save, read_checkpoint, remove_stale_temps

__all__ = ["TrainConfig", "run", "lr_at", "autocast", "save_checkpoint", "load_checkpoint", "atomic_save",
           "NonFiniteLossError", "check_finite", "Progress", "trainable", "enable_gradient_checkpointing"]


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
    precision: str = "auto"  # see autocast(): auto (bf16 on a GPU, float32 on the CPU) | bf16 | fp32 | fp16
    skip_nonfinite: bool = False  # a NaN / inf loss skips its batch (counted) instead of stopping the run


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


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where bf16 autocast roughly doubles
    training speed; elsewhere bf16 on the CPU is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision mode: "auto" = bf16 on a GPU, float32 on the CPU; "bf16"; "fp32";
    "fp16" (GPUs only; the caller adds a GradScaler)."""
    if precision not in ("auto", "bf16", "fp32", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a GPU; use bf16 on the CPU")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def trainable(model: nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict) -> None:
    """Trainable weights and AdamW moments in one safetensors file, written atomically with its checksum."""
    params = trainable(model)
    tensors = {f"param/{n}": p.detach().contiguous().cpu() for n, p in params.items()}
    for n, p in params.items():
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}/{n}"] = state[key].contiguous().cpu()
        if "step" in state:
            tensors[f"opt_step/{n}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).cpu()
    atomic_save(Path(path), tensors, {"step": str(step), "extra": json.dumps(extra)})


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
                    ) -> tuple[int, dict]:
    """Trainable weights (and, given an optimizer, its AdamW moments) from `save_checkpoint`'s file, its checksum
    verified (CheckpointError names a corrupt file)."""
    tensors, meta = read_checkpoint(Path(path))
    params = trainable(model)
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks trainable parameters {missing[:5]} (different recipe?)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
            if optimizer is not None and f"exp_avg/{n}" in tensors:
                optimizer.state[p] = {
                    "step": tensors[f"opt_step/{n}"].reshape(()),
                    "exp_avg": tensors[f"exp_avg/{n}"].to(p.dtype),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(p.dtype),
                }
    return int(meta["step"]), json.loads(meta.get("extra", "{}"))


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


def run(model: nn.Module, make_batch: Callable[[int], dict], loss_fn: Callable[[nn.Module, dict], torch.Tensor],
        cfg: TrainConfig, ckpt_path: Optional[Path] = None, label: str = "", log=None,
        param_groups: Optional[list] = None) -> list[float]:
    """Train for cfg.steps; batch i is `make_batch(i)`, so resuming at step k reads exactly the data it would have.
    Returns the loss of every step run in this call."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    groups = param_groups or [{"params": list(trainable(model).values())}]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    start = 0
    if ckpt_path is not None:
        for stale in remove_stale_temps(Path(ckpt_path)):
            log(f"{label} removed {stale}, the temp file of a checkpoint write that was cut short")
    if ckpt_path is not None and Path(ckpt_path).is_file():
        start, _ = load_checkpoint(Path(ckpt_path), model, optimizer)
        log(f"{label} resumed from {ckpt_path} at step {start}")
    progress, losses, skipped = Progress(cfg.steps, cfg.batch_size, start, label), [], 0
    device = next(model.parameters()).device
    precision = autocast(device, cfg.precision)
    model.train()
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        with precision:
            loss = loss_fn(model, to_device(make_batch(step), device))
        optimizer.zero_grad(set_to_none=True)
        value, applied = float(loss.detach()), False
        if check_finite(step + 1, value, skip=cfg.skip_nonfinite):
            loss.backward()
            params = [p for g in groups for p in g["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if cfg.grad_clip else None
            if check_finite(step + 1, value, norm, skip=cfg.skip_nonfinite):
                optimizer.step()
                applied = True
        if not applied:
            skipped += 1
            log(f"{label} step {step + 1}: the loss or gradient is not finite; batch skipped ({skipped} so far)")
        elif (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            losses.append(value)
            log(progress.update(step, value, lr))
        else:
            losses.append(value)
            progress.losses.append(value)
        if ckpt_path is not None and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(Path(ckpt_path), model, optimizer, step + 1, {"config": asdict(cfg)})
    model.eval()
    return losses


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
