"""How one training run uses the GPU: compiled blocks, gradient checkpointing, parked encoders, attention.

* :func:`compile_blocks` compiles each repeated transformer block (with its
  LoRA layers) on CUDA, lossless, sharing the sampling path's disk cache.
* :func:`checkpointing` recomputes every ``interval``-th block in the backward
  pass (1 = every block: least memory; 2 = every other block: faster).
* :func:`parked` moves the text encoders and the VAE to the CPU while the
  transformer trains on their cached outputs (about 10 GiB for FLUX.1), and
  :func:`unparked` brings them back for preview samples.
* :func:`transformer_on` keeps a model-offloaded transformer on the GPU while it trains.
* :func:`attention_backends` picks the SDPA kernels of a training step (cuDNN, with a gradient-layout fix).

Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

PARKABLE = ("text_encoder", "text_encoder_2", "vae")  # what the transformer does not need while it trains


def compile_blocks(pipe: Any, device: Any, log: Any) -> bool:
    """Compile the blocks for training on CUDA (fp8-stored weights too: their layers have no hooks, and their
    dequantizing matmul is one operator the compiler keeps whole), unless FLUXKILN_COMPILE=0."""
    from fluxkiln.plugins.flux import fast

    if device.type != "cuda" or fast.compile_disabled():
        return False
    if not fast.is_compiled(pipe.transformer):
        fast.compile_blocks(pipe.transformer, saved=False)
        log("transformer blocks compiled for training (the first step of each size pays the compilation)")
    return True


def checkpointing(transformer: Any, interval: int, compiled: bool = False, backend: str = "inductor") -> None:
    """Recompute every ``interval``-th block (counting double then single blocks) in the backward pass.

    With ``compiled`` blocks the checkpoint goes inside the compiled region (Dynamo traces it and the
    partitioner recomputes the block in the backward graph): wrapped around a compiled block from outside,
    the block would fall back to eager under the checkpoint's saved-tensor hooks.
    """
    import torch.utils.checkpoint

    from fluxkiln.plugins.flux.fast import blocks

    chosen = {id(b) for i, b in enumerate(blocks(transformer)) if i % interval == 0}
    inside = _compiled_checkpoint(backend) if compiled else None

    def run(block: Any, *args: Any) -> Any:
        if id(block) not in chosen:
            return block(*args)
        if inside is not None:
            return inside(block, *args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=run)


@functools.cache
def _compiled_checkpoint(backend: str) -> Any:
    """One compiled "checkpoint this block" function (its code is shared by all blocks of a class)."""
    import torch
    import torch.utils.checkpoint

    def checkpointed(block: Any, *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    return torch.compile(checkpointed, backend=backend, dynamic=False)


def transformer_on(pipe: Any, device: Any) -> None:
    """With ``offload = "model"`` the transformer may wait on the CPU: bring it to ``device`` before the adapter
    and its optimizer state are made (its offload hook moves it back and forth for previews)."""
    if getattr(pipe, "_fluxkiln_offload", "none") != "model":
        return
    # their offload hooks would only move them off the GPU once the transformer runs
    _move(pipe, [n for n in PARKABLE if getattr(pipe, n, None) is not None], "cpu")
    pipe.transformer.to(device)


def parkable(pipe: Any, device: Any, text_cached: bool, latents_cached: bool) -> list[str]:
    """The pipeline parts that can wait on the CPU while the transformer trains."""
    if device.type != "cuda" or getattr(pipe, "_fluxkiln_offload", "none") != "none":
        return []  # nothing to gain on the CPU; offloaded pipelines move their parts themselves
    wanted = {"text_encoder": text_cached, "text_encoder_2": text_cached, "vae": latents_cached}
    return [n for n in PARKABLE if wanted[n] and getattr(pipe, n, None) is not None]


@contextlib.contextmanager
def _moved(pipe: Any, names: list[str], inside: Any, after: Any) -> Iterator[None]:
    """``names`` on device ``inside`` within the block, on ``after`` once it ends (also on error); the CUDA
    cache is emptied whenever they leave the GPU."""
    if not names:
        yield
        return
    _move(pipe, names, inside)
    try:
        yield
    finally:
        _move(pipe, names, after)


def _move(pipe: Any, names: list[str], device: Any) -> None:
    import torch

    for name in names:
        getattr(pipe, name).to(device)
    if torch.device(device).type == "cpu":
        torch.cuda.empty_cache()


def parked(pipe: Any, names: list[str], device: Any) -> contextlib.AbstractContextManager[None]:
    """Keep ``names`` on the CPU inside the block, and put them back on ``device`` afterwards (also on error)."""
    return _moved(pipe, names, "cpu", device)


def unparked(pipe: Any, names: list[str], device: Any) -> contextlib.AbstractContextManager[None]:
    """Bring parked parts back to ``device`` for a while (preview samples), then park them again."""
    return _moved(pipe, names, device, "cpu")


def attention_backends(device: Any) -> Any:
    """The SDPA kernels a training step uses on CUDA (a no-op context elsewhere).

    cuDNN attention first (forward and backward at 1024² take 1.7 ms against flash's 3.2 ms on an H100),
    with the output gradient handed back in the output's own layout: with the layout diffusers' permute
    leaves it in, cuDNN's backward failed with illegal memory accesses (``bench/attention_backward.py``).
    ``FLUXKILN_TRAIN_ATTENTION=flash`` restricts training to the flash and memory-efficient kernels.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if os.environ.get("FLUXKILN_TRAIN_ATTENTION", "cudnn").strip().lower() == "flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                     SDPBackend.EFFICIENT_ATTENTION], set_priority=True))
    stack.enter_context(gradient_in_output_layout())
    return stack


@contextlib.contextmanager
def gradient_in_output_layout() -> Iterator[None]:
    """Inside the block, SDPA's output gradient reaches the kernel's backward in the output's memory layout.

    It replaces ``torch.nn.functional.scaled_dot_product_attention`` for the duration of one training step
    (diffusers looks the function up on every call, and nodes run one at a time).  The wrapper is made once
    per process, so compiled blocks that traced it stay valid from step to step.
    """
    import torch.nn.functional as F

    real, wrapper = _sdpa_pair()
    F.scaled_dot_product_attention = wrapper
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@functools.cache
def _sdpa_pair() -> tuple[Any, Any]:
    """(torch's SDPA, the same with :class:`SameLayoutGrad` on its output when gradients flow)."""
    import torch
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    class SameLayoutGrad(torch.autograd.Function):
        """Identity whose backward copies the incoming gradient into the forward output's strides."""

        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            ctx.shape, ctx.stride = tuple(x.shape), tuple(x.stride())
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            if tuple(grad.stride()) == ctx.stride:
                return grad
            out = torch.empty_strided(ctx.shape, ctx.stride, dtype=grad.dtype, device=grad.device)
            return out.copy_(grad)

    def sdpa(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        return SameLayoutGrad.apply(out) if torch.is_grad_enabled() and out.requires_grad else out

    return real, sdpa
