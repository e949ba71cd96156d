"""Data-parallel training with ``torch.distributed``: one process per device, started by torchrun.

torchrun (locally: ``torchrun --standalone --nproc_per_node N train.py ...``; on SageMaker:
``distribution={"torch_distributed": {"enabled": True}}``) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; without them, or with a world of one, train.py runs the
single-process path untouched. In a world of several processes:

- ``--batch-size`` stays the global batch: each process takes ``batch-size / world`` images a step
  from its shard of a DistributedSampler permutation (seeded by ``--seed``, ``set_epoch`` each epoch),
  and DistributedDataParallel averages the gradients, so the learning rate keeps its meaning;
- batch-norm running statistics (rank 0's at the start of each step, DistributedDataParallel's
  default) are averaged over the processes after each epoch, so every process holds the same
  weights; the eval channel is split between them and its sums all-reduced, so every process sees
  the same metrics and takes the same best epoch and early stop;
- rank 0 alone writes checkpoints (with every rank's random states), metric lines, the model dir and
  the profiler and debugger output; the other ranks print nothing to stdout (errors still reach stderr).

Gloo on CPUs, NCCL on GPUs.

What is guaranteed: the same seed, flags and number of processes give the same numbers (bit for bit
on CPUs with ``--deterministic``, as tested), and a run killed and resumed from its checkpoint ends
as an uninterrupted one. N processes do not repeat one process's numbers: they shuffle with the
DistributedSampler, draw their own augmentations, and normalize each batch norm over a share of
the batch. They take the same steps in expectation (the same global batch, an averaged gradient,
the same learning rate), so their results agree within the run-to-run spread of seeds, not exactly.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sm_scripts.errors import TrainingError


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metric lines and the model dir."""
        return self.rank == 0


SINGLE = Cluster()  # a run of one process


def join_cluster(use_cuda: bool) -> Cluster:
    """Join the process group torchrun describes in the environment (none: a single process)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    cluster = Cluster(int(env["RANK"]), world, int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", world)))
    if use_cuda:
        if cluster.local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"local rank {cluster.local_rank} has no GPU ({torch.cuda.device_count()} here): start at most "
                "one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(cluster.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if not cluster.main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process: one set of metric lines
    return cluster


def leave_cluster(cluster: Cluster) -> None:
    if cluster.distributed and dist.is_initialized():
        dist.destroy_process_group()


def local_batch_size(batch_size: int, cluster: Cluster) -> int:
    """Each process's share of the global ``--batch-size``."""
    if batch_size % cluster.world:
        raise TrainingError(
            f"--batch-size {batch_size} does not split evenly over {cluster.world} processes: it is the global "
            f"batch, so pick a multiple of {cluster.world}"
        )
    return batch_size // cluster.world


def shard_order(size: int, epoch: int, seed: int, cluster: Cluster) -> torch.Tensor:
    """This process's indexes for ``epoch``: its shard of a permutation every process draws alike
    (padded by repeats so each shard is as long: every process then runs as many steps)."""
    sampler = torch.utils.data.DistributedSampler(
        range(size), num_replicas=cluster.world, rank=cluster.rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def eval_order(size: int, cluster: Cluster) -> torch.Tensor:
    """This process's part of the eval channel: every image scored once by exactly one process."""
    return torch.arange(cluster.rank, size, cluster.world)


def wrap(trained: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around what each step calls (it averages the gradients of every step)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(trained, device_ids=device_ids)


def unwrap(trained: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (evaluation runs it on a process's own part)."""
    return trained.module if isinstance(trained, nn.parallel.DistributedDataParallel) else trained


def sum_over_processes(values: list[float], device: torch.device, cluster: Cluster) -> list[float]:
    """Each value summed over the processes (a single process: the values as they are)."""
    if not cluster.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def average_buffers(model: nn.Module, cluster: Cluster) -> None:
    """Average the floating-point buffers (batch-norm running statistics) over the processes."""
    if not cluster.distributed:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(cluster.world)


def gather_to_main(value: Any, cluster: Cluster) -> list[Any] | None:
    """Every process's ``value``, in rank order, on rank 0 (None elsewhere)."""
    gathered: list[Any] | None = [None] * cluster.world if cluster.main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def from_main(value: Any, cluster: Cluster) -> Any:
    """Rank 0's ``value`` on every process."""
    if not cluster.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
