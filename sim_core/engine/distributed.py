"""torchrun support: process group, rank, all-reduce, rank-0-only writes.

``simbench train`` is the same entry point for 1 process and for ``torchrun
--nproc_per_node N`` (one or many nodes): when torchrun's environment variables
are present, the process group is initialised (nccl on GPU, gloo on CPU).
The effective batch size and learning rate stay the same for any process count:
each iteration consumes ``train.batch_size`` images in total, split over the
processes and, when that is more than they hold at once
(``train.batch_per_process``), accumulated over several micro-batches.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sim_core.errors import InputError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def accumulation_steps(batch_size: int, batch_per_process: int, world_size: int) -> int:
    """Micro-batches per iteration so that ``batch_size`` images are seen in total."""
    per_process = batch_size // world_size
    if per_process * world_size != batch_size:
        raise InputError("train.batch_size", f"{batch_size} images cannot be split evenly over {world_size} processes")
    steps = max(1, -(-per_process // batch_per_process))
    if per_process % steps:
        raise InputError("train.batch_per_process",
                         f"{per_process} images per process cannot be split into {steps} equal micro-batches")
    return steps


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce gradients (used instead of DDP's hooks to keep accumulation simple)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
