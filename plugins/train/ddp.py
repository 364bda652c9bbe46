"""Data-parallel LoRA training: every rank trains on its slice of one global batch, gradients summed across ranks.

With N processes the global batch is ``batch_size`` × N.  Every rank draws the
same global batch, caption dropout, noise and times from the shared seed (so
the run is the one a single process would make with the global batch), then
computes only its slice.  Each rank weights its slice's mean loss by its share
of the batch, and one ``all_reduce`` sums the LoRA gradients (and the loss):
the sum is the gradient of the global batch's mean loss, exactly what DDP
computes.  The optimizer step is then identical on every rank, so the weights
never drift apart.  The learning rate is not scaled: a run with N processes
behaves like one process with ``batch_size`` × N.  Only rank 0 writes
checkpoints, samples, logs and the exported LoRA; a checkpoint records N and a
resume with another N is refused.
"""

from __future__ import annotations

from typing import Any

from fluxkiln.engine import NodeError, distributed


class DataParallel:
    """The training loop's view of the world (a world of one trains exactly as before)."""

    def __init__(self) -> None:
        self.world = distributed.current()

    @property
    def owner(self) -> bool:
        return self.world.owner

    @property
    def size(self) -> int:
        return self.world.size

    def part(self, n: int) -> range:
        """This rank's slice of a global batch of ``n`` samples."""
        return distributed.shard(n, self.world)

    def share_checkpoint(self, load: Any) -> Any:
        """Rank 0 loads the newest checkpoint (``load()``); every rank gets it, and a different N is refused."""
        if not self.world.many:
            found = load()
        else:
            box = None
            if self.owner:
                try:
                    box = ("ok", load())
                except NodeError as exc:
                    box = ("error", exc)
            box = distributed.broadcast(box)
            if box[0] == "error":
                raise box[1]
            found = box[1]
        if hasattr(found, "meta"):  # a checkpoint (not None or "train from scratch")
            saved = int(found.meta.get("world_size", 1))
            if saved != self.size:
                raise NodeError(f"checkpoint {found.path.name} was written by a run with {saved} process(es) "
                                f"(global batch = batch_size x {saved}); this run has {self.size}",
                                hint=f"resume with --gpus {saved} (the same number of processes), or delete "
                                     f"{found.path.parent.parent} to start over")
        return found

    def sync(self, params: list[Any], loss_part: float) -> float:
        """Sum every rank's gradients (already weighted by its share of the batch) and loss parts.

        One float32 all-reduce of every gradient and the loss, in a handful of kernels whatever the number
        of parameters: one concatenation, one cast to float32, one multi-tensor copy back (a copy per
        parameter would be ~2,000 tiny kernels for FLUX's LoRA, launched while the GPU waits)."""
        if not self.world.many:
            return loss_part
        import torch
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten(grads, loss_part, params[0].device if params else torch.device("cpu"))
        dist.all_reduce(flat)
        if grads:
            with torch.no_grad():
                torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat[:-1], grads))
        return float(flat[-1].item())

    def agree_stop(self, stop: bool) -> bool:
        """True on every rank if any rank was asked to stop (each then stops after the same step)."""
        if not self.world.many:
            return stop
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if stop else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _flatten(grads: list[Any], loss_part: float, device: Any) -> Any:
    """The gradients, then the loss, in one new float32 vector (the values exactly as they are)."""
    import torch

    flat = torch.empty(sum(g.numel() for g in grads) + 1, dtype=torch.float32, device=device)
    flat[-1:].fill_(loss_part)
    if grads:  # one concatenation (its loop over the tensors in C++), then one copy that casts to float32
        flat[:-1].copy_(torch._utils._flatten_dense_tensors(grads))
    return flat
