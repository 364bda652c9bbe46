"""One compiled variant for every single-stream block: the first one is called with its inputs laid out as the
others are.

A FLUX single-stream block joins its text and image tokens into one tensor and returns them as two views of it,
so every single-stream block after the first is called with strided inputs, while the first gets the last
double-stream block's two separate, contiguous tensors.  torch.compile specialises on strides, so the first
block compiled a variant of its own: one more trace and one more Inductor compilation on a cold cache, and one
more precompiled file.  :class:`Joined` wraps the first single-stream block's compiled call: it joins its two
inputs into one tensor (the concatenation the block begins with anyway) and passes views of it, as the block
before would have.  The values are the same, and so is the output, bit for bit.

Nothing here imports torch at module level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Joined:
    """The first single-stream block's compiled call, given its text and image tokens as views of one tensor.

    Calls with gradients (training), with hooks on the block, with positional arguments (gradient checkpointing)
    or with inputs that are not two contiguous ``(batch, tokens, dim)`` tensors alike go to ``inner`` as they
    are."""

    def __init__(self, block: Any, inner: Callable[..., Any]) -> None:
        import torch

        self.block, self.inner, self.torch = block, inner, torch

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args and self._joinable(kwargs.get("encoder_hidden_states"), kwargs.get("hidden_states")):
            text, image = kwargs["encoder_hidden_states"], kwargs["hidden_states"]
            both = self.torch.cat([text, image], dim=1)
            n = text.shape[1]
            kwargs = dict(kwargs, encoder_hidden_states=both[:, :n], hidden_states=both[:, n:])
        return self.inner(*args, **kwargs)

    def _joinable(self, text: Any, image: Any) -> bool:
        torch, block = self.torch, self.block
        if not (isinstance(text, torch.Tensor) and isinstance(image, torch.Tensor)):
            return False
        if torch.is_grad_enabled() or block._forward_hooks or block._forward_pre_hooks:
            return False
        return (text.dim() == image.dim() == 3 and text.shape[0] == image.shape[0]
                and text.shape[2] == image.shape[2] and text.dtype == image.dtype and text.device == image.device
                and text.is_contiguous() and image.is_contiguous())


def install(blocks: list[Any]) -> None:
    """Wrap the compiled call of the first of ``blocks`` (a transformer's single-stream blocks), once."""
    first = blocks[0] if blocks else None
    call = getattr(first, "_compiled_call_impl", None)
    if call is not None and not isinstance(call, Joined):
        first._compiled_call_impl = Joined(first, call)


def inner(call: Any) -> Any:
    """The compiled call a :class:`Joined` wraps (the call itself otherwise)."""
    return call.inner if isinstance(call, Joined) else call
