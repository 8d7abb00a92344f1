"""Data-parallel training with torch.distributed: one process per CPU group or GPU, started by torchrun.

    torchrun --standalone --nproc-per-node 2 -m imcap train configs/flickr8k.yaml     # one machine
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m imcap train ...

Every process reads the same data, features and batch order; each takes its share of every batch's images
(rank r takes images r, r + world, ...). The loss of a step is normalised by the token count of the whole
(global) batch, so DistributedDataParallel's gradient average equals the gradient of one process training
on that batch. Rank 0 alone validates and writes checkpoints, metrics and plots; the others wait for it.
Without torchrun's environment (WORLD_SIZE unset or 1) nothing here starts a process group.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
# rank 0 alone extracts features and validates while the others wait: long barriers are normal here
BARRIER_TIMEOUT = timedelta(hours=3)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_default_device)

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates and writes files."""
        return self.rank == 0


def start() -> Process:
    """The process group torchrun describes in the environment (gloo on CPU, NCCL on GPUs), or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Process()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return Process(rank=rank, world=world, local_rank=local_rank, device=device)


def stop(process: Process) -> None:
    if process.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(process: Process) -> None:
    if process.world > 1:
        dist.barrier()


def main_first(process: Process, work: Callable[[], T]) -> T:
    """`work()` on rank 0 first (it may write files others then read: a tokenizer, the feature cache),
    then on the other ranks."""
    if process.main:
        result = work()
    barrier(process)
    if not process.main:
        result = work()
    return result


def wrap(module: nn.Module, process: Process) -> nn.Module:
    """DistributedDataParallel around `module` in a process group; the module itself otherwise."""
    if process.world == 1:
        return module
    device_ids = [process.local_rank] if process.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def all_sum(value: torch.Tensor | float, process: Process) -> torch.Tensor:
    """Sum over ranks (no gradient)."""
    total = torch.as_tensor(value, dtype=torch.float64, device=process.device).detach().clone()
    if process.world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_max(value: float, process: Process) -> float:
    """The largest value over ranks: ranks agree on a clock reading, and so on the step to stop at."""
    if process.world == 1:
        return value
    largest = torch.tensor(value, dtype=torch.float64, device=process.device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)


def global_mean(local_sum: torch.Tensor, local_count: int, process: Process) -> torch.Tensor:
    """The loss to backpropagate so that DDP's gradient average is the gradient of the global-batch mean.

    local_sum: this rank's summed loss (with gradient); local_count: the number of terms in it. DDP averages
    gradients over ranks, hence the factor `world`.
    """
    count = all_sum(float(local_count), process).to(local_sum.dtype)
    return local_sum * process.world / count
