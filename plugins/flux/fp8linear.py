"""The float8 linear layer ``go_fast`` swaps into the transformer blocks (see :func:`fast.fp8_apply`).

A module of its own, importing torch, so the class has an importable name: precompiled blocks
(``fluxkiln warmup``) pickle the modules they call by reference, which a class made inside a function defeats.
"""

from __future__ import annotations

import torch

from .fast import FP8_MAX


class Fp8Linear(torch.nn.Module):
    """A linear layer computed in float8: weights quantized per output row once, activations per row
    on the fly, both scales applied by ``torch._scaled_mm`` (CPU: the same arithmetic, emulated)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (w.float() / scale).to(torch.float8_e4m3fn), persistent=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous(), persistent=False)
        self.original = linear  # the exact bf16 layer, restored by fp8_restore
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.original.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.original.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if x2.is_cuda:
            out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                   out_dtype=x.dtype)
        else:
            out = ((xq.float() * x_scale) @ (self.weight_fp8.float() * self.weight_scale.t()).t()).to(x.dtype)
        if self.original.bias is not None:
            out = out + self.original.bias
        return out.reshape(*shape[:-1], self.out_features)
