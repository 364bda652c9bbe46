"""Data-parallel training of mini-flux over the processes of a ``torchrun`` launch (NCCL on GPUs, gloo on a
CPU), or none at all in a plain single process.

Every rank renders its own data and computes gradients on it; :meth:`World.average_grads` all-reduces
them, so the weights stay identical on every rank.  Rank 0 alone decides: when a phase stops and how
many steps it plans (:meth:`World.agree`), which weights to keep, and it alone logs and writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxkiln.engine import distributed


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_grads(self, params: list[Any]) -> None:
        """Replace every parameter's gradient by its mean over the ranks (one flat all-reduce)."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.size)
        for g, mean in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(mean)

    def agree(self, *values: float) -> list[float]:
        """Rank 0's ``values`` on every rank."""
        if self.size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return t.tolist()

    def same_weights(self, modules: list[Any]) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for mod in modules:
            for t in list(mod.parameters()) + list(mod.buffers()):
                dist.broadcast(t.data, 0)

    def agreeing(self, modules: list[Any]) -> bool:
        """Whether every rank holds the same weights (a checksum of the parameters, compared across ranks)."""
        if self.size == 1:
            return True
        import torch
        import torch.distributed as dist

        total = sum(p.detach().double().sum() for mod in modules for p in mod.parameters())
        low, high = total.clone().reshape(1), total.clone().reshape(1)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool(torch.equal(low, high))

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        distributed.shutdown()


def join() -> World:
    """This process's place in a ``torchrun`` launch (``WORLD_SIZE`` > 1), with its process group started
    and its GPU chosen by fluxkiln's own :func:`~fluxkiln.engine.distributed.init`; a one-process world
    otherwise."""
    import torch

    joined = distributed.init()
    return World(joined.rank, joined.size, "cuda" if torch.cuda.is_available() else "cpu")  # "cuda": the set device
