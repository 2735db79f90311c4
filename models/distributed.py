"""Trainer ranks kept in lockstep with torch.distributed (gloo on CPU, NCCL on GPU).

Each rank trains the examples of its own source partitions; every step, all ranks

- agree on the catalog capacity (E grows to the largest, so sparse gradients line up),
- sum the examples' weights, so each rank's loss is its share of one global mean,
- all-reduce every gradient (E's sparse one included: gloo reduces sparse tensors), so
  the same update lands on every rank and the parameters stay identical,

and per round they all-gather the co-visitation increments, so every rank holds all counts.
A rank with nothing to train still takes part, with zero gradients: the number of steps
per round is the largest any rank needs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from models.covisit import Increment
from models.trainer import Sync


class DistSync(Sync):
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def total_weight(self, w: float) -> float:
        t = torch.tensor([w], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0])

    def reduce_grads(self, dense: Sequence[torch.nn.Parameter],
                     sparse: Sequence[torch.nn.Parameter]) -> None:
        for p in dense:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        for p in sparse:  # a rank without rows to update sends an empty sparse gradient
            p.grad = p.grad.coalesce() if p.grad is not None else torch.sparse_coo_tensor(
                torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0, p.shape[1]),
                p.shape).coalesce()
            dist.all_reduce(p.grad)

    def gather(self, inc: Increment | None) -> list[Increment]:
        out: list = [None] * self.world
        dist.all_gather_object(out, inc)
        return [x for x in out if x is not None]

    def steps(self, n: int) -> int:
        return self.max_int(n)

    def max_int(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0])

    def sum(self, x: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(x, np.float64)).clone()
        dist.all_reduce(t)
        return t.numpy()

    def union(self, names: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(n for part in self.all_gather(list(names)) for n in part))

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (decisions all ranks must take together)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: object) -> list:
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init(rank: int, world: int, address: str = "127.0.0.1", port: int = 29500) -> DistSync:
    """Join the process group (gloo on CPU, NCCL when CUDA is there)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("MASTER_ADDR", address)
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    return DistSync(rank, world)


class ThreadGroup:
    """K trainer ranks as threads of one process (the evaluator's `--trainer-ranks`): the
    collectives of DistSync, over a barrier instead of gloo."""

    def __init__(self, world: int, timeout_s: float = 600.0):
        self.world = world
        self._barrier = threading.Barrier(world, timeout=timeout_s)
        self._slots: list = [None] * world

    def sync(self, rank: int) -> ThreadSync:
        return ThreadSync(self, rank)

    def exchange(self, rank: int, value: object) -> list:
        """Every rank's `value`, on every rank."""
        self._slots[rank] = value
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before all have read
        return out


class ThreadSync(Sync):
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world = group, rank, group.world

    def total_weight(self, w: float) -> float:
        return float(sum(self.group.exchange(self.rank, w)))

    def reduce_grads(self, dense: Sequence[torch.nn.Parameter],
                     sparse: Sequence[torch.nn.Parameter]) -> None:
        for p, is_sparse in [*((p, False) for p in dense), *((p, True) for p in sparse)]:
            grads = [g for g in self.group.exchange(self.rank, p.grad) if g is not None]
            if not grads:
                p.grad = None if is_sparse else torch.zeros_like(p)
                continue
            total = grads[0]
            for g in grads[1:]:
                total = total + g
            p.grad = total.coalesce() if is_sparse else total.clone()

    def gather(self, inc: Increment | None) -> list[Increment]:
        return [x for x in self.group.exchange(self.rank, inc) if x is not None]

    def steps(self, n: int) -> int:
        return self.max_int(n)

    def max_int(self, n: int) -> int:
        return max(self.group.exchange(self.rank, n))

    def sum(self, x: np.ndarray) -> np.ndarray:
        return np.sum(self.group.exchange(self.rank, np.asarray(x, np.float64)), axis=0)

    def union(self, names: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(n for part in self.group.exchange(self.rank, list(names))
                                  for n in part))
