"""Optimizers, the learning-rate schedule and the EMA of the LoRA weights.

Every optimizer Replicate's trainer offers is here: torch's own (adamw, adam,
adafactor, adagrad, sgd), lion (written here from the paper's update rule),
the bitsandbytes 8-bit ones (GPU only) and prodigy (the ``prodigyopt``
package).  ``auto`` picks adamw8bit where it can run and adamw elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

from fluxkiln.engine import NodeError

EIGHT_BIT = {"adamw8bit": "AdamW8bit", "adam8bit": "Adam8bit", "lion8bit": "Lion8bit"}
WEIGHT_DECAY = 1e-4


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken bitsandbytes install raises all sorts of errors on import
        return False
    return True


def resolve_name(name: str, device: str) -> str:
    """The optimizer actually used (``auto`` resolved); NodeError when it cannot run here."""
    if name == "auto":
        return "adamw8bit" if device == "cuda" and _has_bitsandbytes() else "adamw"
    if name in EIGHT_BIT:
        if device != "cuda":
            raise NodeError(f"optimizer = \"{name}\" needs an NVIDIA GPU (bitsandbytes 8-bit optimizers run on "
                            "CUDA only) and this machine has none", key="optimizer",
                            hint='use optimizer = "adamw" (or "auto": adamw8bit on a GPU, adamw elsewhere)')
        if not _has_bitsandbytes():
            raise NodeError(f"optimizer = \"{name}\" needs the bitsandbytes package", key="optimizer",
                            hint='pip install bitsandbytes, or use optimizer = "adamw"')
    return name


def make_optimizer(name: str, params: list[Any], lr: float, log: Any = None) -> Any:
    """Build the optimizer ``name`` (already resolved) over ``params``."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise NodeError("optimizer = \"adafactor\" needs torch >= 2.5", key="optimizer", hint='use "adamw"')
        return torch.optim.Adafactor(params, lr=lr)
    if name == "lion":
        return lion_class()(params, lr=lr, betas=(0.9, 0.99), weight_decay=WEIGHT_DECAY)
    if name in EIGHT_BIT:
        import bitsandbytes as bnb

        return getattr(bnb.optim, EIGHT_BIT[name])(params, lr=lr)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise NodeError("optimizer = \"prodigy\" needs the prodigyopt package", key="optimizer",
                            hint='pip install prodigyopt, or use optimizer = "adamw"') from exc
        if log and lr != 1.0:
            log(f"prodigy adapts its own step size; learning_rate = {lr} scales it (1.0 is the usual choice)")
        return Prodigy(params, lr=lr, weight_decay=WEIGHT_DECAY)
    raise NodeError(f"unknown optimizer {name!r}", key="optimizer")


_LION: list[type] = []


def lion_class() -> type:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as a torch Optimizer.

    update = sign(beta1 * m + (1 - beta1) * g); p -= lr * (update + wd * p);
    m = beta2 * m + (1 - beta2) * g.  Defined on first use (torch is imported lazily).
    """
    if _LION:
        return _LION[0]
    import torch

    class _Lion(torch.optim.Optimizer):
        def __init__(self, params: Any, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
            super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            loss = closure() if closure is not None else None
            for group in self.param_groups:
                b1, b2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["exp_avg"] = torch.zeros_like(p)
                    m = state["exp_avg"]
                    update = (m * b1 + p.grad * (1 - b1)).sign_()
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                    m.mul_(b2).add_(p.grad, alpha=1 - b2)
            return loss

    _Lion.__name__ = _Lion.__qualname__ = "Lion"
    _LION.append(_Lion)
    return _Lion


def lr_lambda(kind: str, warmup: int, total: int) -> Any:
    """The LR multiplier for step ``s`` (0-based) of ``total``."""
    def f(s: int) -> float:
        if warmup and s < warmup and kind != "constant":
            return (s + 1) / warmup
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def make_scheduler(optimizer: Any, kind: str, warmup: int, total: int) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup, total))


class EMA:
    """Exponential moving average of the trainable weights, with warm-up.

    The decay used at update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so the
    average follows the weights closely early on instead of being dominated by
    their (zero) starting value for hundreds of steps.
    """

    def __init__(self, named: dict[str, Any], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.detach().float().clone() for k, p in named.items()}

    def update(self, named: dict[str, Any]) -> None:
        import torch

        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for k, p in named.items():
                if self.shadow[k].device != p.device:
                    self.shadow[k] = self.shadow[k].to(p.device)
            shadows = [self.shadow[k] for k in named]
            values = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in named.values()]
            torch._foreach_mul_(shadows, d)  # one kernel per op for all the weights, not one per tensor
            torch._foreach_add_(shadows, values, alpha=1 - d)
        self.updates += 1

    def load(self, shadow: dict[str, Any], updates: int) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(shadow[k])
        self.updates = updates
