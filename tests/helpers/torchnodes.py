"""A test plugin node that keeps torch busy (intra-op threads and autograd) until it is cancelled."""

from __future__ import annotations

from fluxkiln.engine import RunContext, Text, hookimpl, node


@node("torch_spin", version="1", cache="never")
def torch_spin(ctx: RunContext, steps: int = 100_000) -> Text:
    """Multiply and backpropagate through random matrices, checking for cancellation each step."""
    import torch

    w = torch.randn(256, 256, requires_grad=True)
    for step in range(steps):
        loss = (torch.randn(256, 256) @ w).square().mean()
        loss.backward()
        ctx.progress(step + 1, steps)
        ctx.check_cancelled()
    return Text("done")


@hookimpl
def register_node_types(register):
    register(torch_spin)
