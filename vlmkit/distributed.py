"""Processes started by torchrun, as training and evaluation both use them: rank, world size, each process's
device, the process group (gloo on the CPU, nccl on GPUs) and the few collectives they need.

    ctx = init_processes("auto")    # reads RANK / WORLD_SIZE / LOCAL_RANK; cuda:LOCAL_RANK when CUDA is there
    ctx.barrier(); ctx.sum(1.5); ctx.all_gather({"any": "picklable object"})
    shutdown(ctx)

One process (no torchrun, or --nproc_per_node 1): no process group, and every collective is the identity.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .hardware import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, value: float) -> float:
        """Sum of a number over all processes (float64 on the CPU for gloo, on the device for nccl)."""
        if not self.active:
            return float(value)
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item())

    def all_gather(self, obj) -> list:
        """Every process's `obj` (anything picklable), in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_processes(device: Optional[str] = None, timeout_minutes: float = 30) -> DistContext:
    """The process group from torchrun's environment (nothing to do for a single process). `device` None, "auto"
    or "cuda": under torchrun each process takes its own GPU, cuda:LOCAL_RANK. A collective that waits longer than
    `timeout_minutes` for a process fails."""
    world = world_size()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)  # "auto"/None: CUDA, then MPS, then CPU; an unavailable device fails here
    use_cuda = dev.type == "cuda"
    if use_cuda and (device is None or str(device) in ("auto", "cuda")):
        if local >= torch.cuda.device_count():
            raise ValueError(f"process {local} of this machine has no GPU of its own: {torch.cuda.device_count()} "
                             f"visible; start at most that many (--nproc_per_node), or pass --device cpu")
        dev = torch.device(f"cuda:{local}")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank, world, local, dev)


def shutdown(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()
        dist.destroy_process_group()
