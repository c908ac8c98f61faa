"""Data-parallel training: what the engine does differently when it runs as one of N workers.

The process group is set up by whoever starts the workers (Ray Train's ``TorchTrainer`` in
workers/train.py: gloo on CPU, NCCL on GPU); the engine only reads it. Every worker runs the same
``fit``: the same seed, the same batches in the same order. Each worker trains on its slice of every
batch (rows ``[r*n/N, (r+1)*n/N)``), and after every backward the gradients are averaged over the
workers, so an update is that of the whole batch, as with one worker: the recipe (batch size, steps
per epoch, learning rate) does not change with the worker count.

Gradients are averaged with one flattened all-reduce per backward (what DDP's reducer does, without
its overlap with the backward pass), not by wrapping the networks in ``DistributedDataParallel``:
methods call sub-networks (``features`` then ``head``) and step several optimisers in one training
step (CAF, PT), which DDP's wrapper would not see. Batch-norm statistics are averaged over the
workers after every epoch, and the networks are broadcast from worker 0 at the start, so every worker
holds the same model at every epoch's end and only worker 0 writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "average_buffers", "average_gradients", "average_scalars", "barrier", "broadcast_modules",
           "current_world", "leading_size", "shard_batch", "sum_int"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def primary(self) -> bool:
        """The worker that writes checkpoints, metrics and figures and reports progress."""
        return self.rank == 0


def current_world() -> World:
    """This process's place in the torch.distributed process group; one worker when there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def shard_batch(batch: Any, world: World) -> Any:
    """This worker's contiguous slice of every tensor in ``batch`` (tuples, lists and dicts are walked)."""
    if torch.is_tensor(batch):
        n = batch.shape[0]
        return batch[world.rank * n // world.size:(world.rank + 1) * n // world.size]
    if isinstance(batch, tuple):
        return tuple(shard_batch(b, world) for b in batch)
    if isinstance(batch, list):
        return [shard_batch(b, world) for b in batch]
    if isinstance(batch, dict):
        return {k: shard_batch(v, world) for k, v in batch.items()}
    return batch


def leading_size(batch: Any) -> int | None:
    """The first dimension of the first tensor in ``batch`` (None: no tensor)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for b in items:
        n = leading_size(b)
        if n is not None:
            return n
    return None


def _average_in_place(tensors: list[torch.Tensor], world: World) -> None:
    """Replace each tensor by its mean over the workers, with one flat all-reduce (as DDP's buckets)."""
    if not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= world.size
    for t, avg in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(avg)


def average_gradients(optimizers: Sequence[torch.optim.Optimizer], world: World) -> None:
    """Replace every gradient of ``optimizers``' parameters by its mean over the workers."""
    _average_in_place([p.grad for opt in optimizers for g in opt.param_groups for p in g["params"]
                       if p.grad is not None], world)


def average_buffers(modules: Iterable[nn.Module], world: World) -> None:
    """Average floating-point buffers (batch-norm running statistics) over the workers."""
    _average_in_place([b for m in modules for b in m.buffers() if b.is_floating_point()], world)


def broadcast_modules(modules: Iterable[nn.Module]) -> None:
    """Give every worker worker 0's parameters and buffers (the same start, whatever each one loaded)."""
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            dist.broadcast(t.data, src=0)


def average_scalars(values: Mapping[str, float], world: World, device: torch.device) -> dict[str, float]:
    """The workers' mean of each scalar (every worker passes the same keys)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world.size
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    dist.barrier()


def sum_int(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())
