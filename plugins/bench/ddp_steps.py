"""LoRA training steps for ``fluxkiln bench --gpus N``, made of the trainer's own parts.

Random latents and text embeddings of the right shapes, the flow-matching loss
on this rank's slice of the global batch (``flow_loss(part=...)``), and the
gradient sum across ranks (``DataParallel.sync``): what ``train_lora`` does per
step, without a dataset, so one process at batch B and N processes at N × B can
be timed in the same run.  Each step marks its phases (``phase:forward``,
``backward``, ``loss_item``, ``sync``, ``optimizer``) for ``--profile``; outside
a profiler those marks cost a few microseconds.
"""

from __future__ import annotations

from typing import Any

from fluxkiln.engine import distributed
from fluxkiln.plugins.train import adapter, gpu
from fluxkiln.plugins.train.ddp import DataParallel
from fluxkiln.plugins.train.flow import flow_loss


class DdpSteps:
    """A rank-16 LoRA on ``pipe``'s transformer and an optimizer, stepped on random data."""

    def __init__(self, pipe: Any, device: str, resolution: int, rank: int = 16) -> None:
        import torch

        self.pipe, self.resolution, self.rank = pipe, resolution, rank
        self.device = torch.device(device)
        self.had_gc = bool(getattr(pipe.transformer, "gradient_checkpointing", False))
        adapter.reset_pipeline_state(pipe, device)
        named = adapter.attach(pipe, adapter.select_layers(pipe.transformer, None), rank, float(rank), 0)
        self.params = list(named.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        if device == "cuda":
            pipe.transformer.enable_gradient_checkpointing()
        pipe.transformer.train()
        cfg = pipe.transformer.config
        self.channels, self.text_dim, self.pooled_dim = cfg.in_channels // 4, cfg.joint_attention_dim, \
            cfg.pooled_projection_dim
        self.text_len = 512 if resolution >= 512 else 32
        self.gen = torch.Generator().manual_seed(0)
        self.dtype = pipe.transformer.dtype
        self.data: tuple[Any, Any, Any] | None = None

    def _batch(self, n: int) -> tuple[Any, Any, Any]:
        """``n`` samples of random latents, text embeddings and pooled vectors, made once on the device.

        Drawing a global batch of text embeddings on the CPU every step (8 M values at batch 4) is work a real
        run does not do (it reads cached embeddings), and it grew with N, so it would count against DDP."""
        import torch

        if self.data is None or self.data[0].shape[0] < n:
            side = self.resolution // 8
            make = [(self.channels, side, side), (self.text_len, self.text_dim), (self.pooled_dim,)]
            self.data = tuple(torch.randn(n, *shape, generator=self.gen).to(self.device, self.dtype)
                              for shape in make)
        return tuple(t[:n] for t in self.data)

    def step(self, global_batch: int, alone: bool) -> float:
        """One optimizer step on a global batch; ``alone`` = rank 0 as a world of one (the baseline)."""
        from torch.profiler import record_function

        dp = DataParallel()
        if alone:
            dp.world = distributed.World()
        part = dp.part(global_batch)
        latents, embeds, pooled = self._batch(global_batch)
        share = len(part) / global_batch
        with gpu.attention_backends(self.device):  # the kernels (and gradient layout) train_lora's step uses
            with record_function("phase:forward"):
                loss = flow_loss(self.pipe.transformer, latents, embeds, pooled, self.gen, "sigmoid", self.device,
                                 self.dtype, part=part if dp.size > 1 else None)
            with record_function("phase:backward"):
                if loss is not None:
                    (loss * share).backward()
        with record_function("phase:loss_item"):  # the host waits here for the GPU to finish the backward
            value = float(loss.detach().item()) * share if loss is not None else 0.0
        with record_function("phase:sync"):
            value = dp.sync(self.params, value)
        with record_function("phase:optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return value

    def close(self) -> None:
        adapter.detach(self.pipe, self.had_gc)
