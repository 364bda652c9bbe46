"""The module that stands in for a FLUX modulation linear while :mod:`.modulation` computes its rows ahead.

A module of its own, importing torch, so the class has an importable name: precompiled blocks
(:mod:`.precompiled`) pickle the modules they call by reference, which a class made inside a function defeats.
"""

from __future__ import annotations

import torch


class Tabled(torch.nn.Module):
    """An AdaLayerNorm's linear whose output for this call is already written into ``rows`` (one row per image of
    the batch): its forward returns that buffer and ignores its input.  ``original`` is the linear itself, which
    computes the rows and which :func:`.modulation.remove` puts back."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.original = linear
        self.out_features = int(linear.out_features)
        weight = next(linear.parameters())
        self.register_buffer("rows", torch.zeros(0, self.out_features, dtype=weight.dtype, device=weight.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - the rows were computed from it ahead
        return self.rows
