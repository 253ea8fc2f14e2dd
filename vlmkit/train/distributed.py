"""Data-parallel training with torch.distributed: torchrun environment, DDP or FSDP2 wrapping, and the collectives
the training loop needs (token counts, whole tensors for checkpoints and the merged model).

    torchrun --nproc_per_node 2 -m vlmkit train --model M --data d.json --strategy ddp     # or fsdp
    ctx = init_distributed("auto")        # reads RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on GPUs
    wrapped = wrap_model(model, ctx)      # DDP, FSDP2 (fully_shard per ViT / decoder / cross-attention layer) or as is

Every process reads the same examples list and takes its own slice of each global batch (see finetune.py), so the
update equals one process's on the whole batch: the loss is a sum over label tokens divided by the global count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..distributed import DistContext, init_processes, shutdown  # noqa: F401 -- train calls D.shutdown

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class TrainContext(DistContext):
    """The processes plus how training wraps the model over them."""

    strategy: str = "none"

    def shard(self, items: list) -> list:
        """This process's contiguous share of a global batch (length-grouped batches stay similar per process)."""
        if len(items) % self.world:
            raise ValueError(f"a global batch of {len(items)} does not split over {self.world} processes")
        n = len(items) // self.world
        return items[self.rank * n:(self.rank + 1) * n]


def init_distributed(strategy: str = "auto", device: Optional[str] = None) -> TrainContext:
    """The process group from torchrun's environment (nothing to do for a single process)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    base = init_processes(device)
    world = base.world
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy != "none" and world == 1:
        strategy = "none"  # one process: DDP/FSDP would only add overhead
    if strategy == "none" and world > 1:
        raise ValueError("several processes need --strategy ddp or fsdp")
    return TrainContext(base.rank, world, base.local_rank, base.device, strategy)


def wrap_model(model: nn.Module, ctx: TrainContext, find_unused: bool = True) -> nn.Module:
    """DDP: a replica per process, gradients all-reduced; `find_unused` lets a batch leave trainable parameters
    unused (a text-only batch skips the vision tower and connector), at the cost of a graph walk per step. FSDP2:
    parameters, gradients and optimizer state sharded; one unit per transformer layer so only one layer is ever
    gathered at a time."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if any(type(m).__name__.startswith("Quantized") for m in model.modules()):
            raise NotImplementedError("FSDP over a quantized base is not supported; use --strategy ddp")
        for stack in (model.vision.layers, model.text.layers, getattr(model.text, "cross_blocks", None) or []):
            for layer in stack:
                fully_shard(layer)
        fully_shard(model)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def accumulation_context(model: nn.Module, last_micro_step: bool):
    """DDP: skip the all-reduce on all but the last micro-batch of a step (the gradients add up locally)."""
    if not last_micro_step and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or (hasattr(t, "full_tensor") and hasattr(t, "placements"))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole tensor (an FSDP2 shard is gathered: every process must call this in step)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().contiguous().cpu()


def like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `ref`: this process's shard when ref is an FSDP2 DTensor (no communication: every
    process holds the whole checkpoint), else a copy on ref's device and dtype."""
    full = full.to(device=ref.device, dtype=ref.dtype)
    if _is_dtensor(ref):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)
    return full
