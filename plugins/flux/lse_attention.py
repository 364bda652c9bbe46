"""Attention that also returns its log-sum-exp, and the exact merge of two partial attentions.

Attention of the same queries over two disjoint sets of keys/values can be
computed in two parts and combined without error: each part's output ``o`` is
a softmax-weighted mean over its keys, and its log-sum-exp ``lse`` (the log of
the softmax's denominator) says how much weight that part carries.  With
``m = max(lse1, lse2)``::

    out = (o1 * exp(lse1 - m) + o2 * exp(lse2 - m)) / (exp(lse1 - m) + exp(lse2 - m))

in float32, which equals attention over the concatenated keys (any order).
Context parallelism's ``overlap`` mode uses it to attend to the local keys
while the other ranks' keys are still on their way.

:func:`attend` picks what torch offers on the device, all traceable by
``torch.compile`` without a graph break (the choice is static, by device and
dtype):

- CUDA, float16/bfloat16, head dim a multiple of 8 up to 256: the flash
  kernel (``aten._scaled_dot_product_flash_attention``);
- CUDA otherwise (e.g. float32): the memory-efficient kernel with
  ``compute_log_sumexp=True`` (its log-sum-exp may be padded: cut to the
  query length);
- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu``;
- any other device: plain math attention in float32 (scores, ``logsumexp``,
  softmax), slower and larger, but exact.

Shapes: q (B, H, Sq, D), k and v (B, H, Sk, D) -> output (B, H, Sq, D) in q's
dtype and log-sum-exp (B, H, Sq) in float32.
"""

from __future__ import annotations

from typing import Any


def attend(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """Softmax attention of ``q`` over ``k``/``v`` (no mask, scale 1/sqrt(D)) and its log-sum-exp (float32)."""
    import torch

    device, d = q.device.type, q.shape[-1]
    if device == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
            lse = lse[..., : q.shape[-2]]
        return out, lse.float()
    if device == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse.float()
    return attend_math(q, k, v)


def attend_math(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """The fallback: attention and its log-sum-exp computed plainly in float32 (any device)."""
    import torch

    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def merge(o1: Any, lse1: Any, o2: Any, lse2: Any) -> Any:
    """Combine attention over two disjoint key sets into attention over both (see the module doc); q's dtype out."""
    import torch

    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m).unsqueeze(-1), torch.exp(lse2 - m).unsqueeze(-1)
    out = (o1.float() * w1 + o2.float() * w2) / (w1 + w2)
    return out.to(o1.dtype)
