"""Multi-process training through torch.distributed: what the training loop (`training.py`) needs to run under
`torchrun`, for either example.

    torchrun --standalone --nproc_per_node=2 -m attn_fast.tools.cli train ...      # 2 processes, gloo on CPU
    torchrun --standalone --nproc_per_node=8 -m attn_fast.tools.cli train ...      # 8 GPUs, nccl, one per process
    torchrun --standalone --nproc_per_node=2 -m attn_fast.tools.cli train-captions ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; `setup` reads them, starts the process
group (nccl for CUDA devices, gloo otherwise) and picks the process's device (cuda:LOCAL_RANK). The model is wrapped
in `torch.nn.parallel.DistributedDataParallel`, which averages gradients across processes inside `backward()`, so
every process applies the same update and the weights stay identical (a test checks this bit for bit).

How the work is divided: every process builds the same epoch batch list (a function of seed and epoch only) and
takes every WORLD_SIZE-th batch starting at its rank (`shard`); the tail that does not divide evenly is dropped, so
that all processes run the same number of steps. One optimizer step therefore consumes WORLD_SIZE batches (an
effective batch of WORLD_SIZE x batch_size; the learning rate is not rescaled). Rank 0 alone validates and writes
checkpoints, and sends the metrics to the others; the decision to stop (time limit) is taken jointly.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

Item = TypeVar("Item")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank among world_size processes (a single process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    started_group: bool = False  # this module started the process group, so `teardown` ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_rank() -> int:
    """This process's rank as torchrun launched it (RANK in the environment; 0 without torchrun), known before
    `setup` joins the process group: what decides, before any work, which process claims the output directory."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def setup(device: str) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1 in the environment); returns the context
    and the device this process trains on (`device`, or cuda:LOCAL_RANK when `device` is a CUDA device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), torch.device(device)
    use_cuda = torch.device(device).type == "cuda"
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    return Distributed(dist.get_rank(), dist.get_world_size(), started), torch.device(device)


def teardown(context: Distributed) -> None:
    if context.started_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, context: Distributed, device: torch.device) -> torch.nn.Module:
    """The module that training calls: DistributedDataParallel around `model` when distributed, else `model`.
    DDP copies rank 0's parameters and buffers to the other ranks here, so they all start from the same weights."""
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside what `wrap` returned (the module itself when it is not DistributedDataParallel)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shard(items: Sequence[Item], context: Distributed) -> list[Item]:
    """This rank's share of `items`: every world_size-th item starting at rank, after dropping the tail that would
    leave ranks with different counts (DDP needs every rank to take part in every step)."""
    usable = len(items) - len(items) % context.world_size
    return list(items[context.rank:usable:context.world_size])


def any_rank(flag: bool, context: Distributed) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. one rank ran out of time)."""
    if not context.enabled:
        return flag
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=backend_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(value: Any, context: Distributed) -> Any:
    """Rank 0's `value` on every rank (a picklable object, e.g. the validation metrics)."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: Any, context: Distributed) -> list[Any] | None:
    """[value of rank 0, value of rank 1, ...] on rank 0, None elsewhere (a single process: [value])."""
    if not context.enabled:
        return [value]
    gathered = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
