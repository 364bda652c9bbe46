"""Experiment: which SDPA kernels survive (and how fast are they in) the backward pass of a full-size FLUX.1-dev
LoRA training step at 1024² on this GPU.  GPU.md records cuDNN attention failing there; this checks whether the
failure depends on the layout of the output gradient (diffusers hands SDPA's output back through a permute, so
its gradient arrives with other strides than the output had).

Run on the GPU machine: ``python bench/attention_backward.py OUT.json [VARIANT]``, one variant per process
(a CUDA error leaves the process's context unusable).  Random weights, nothing downloaded.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fluxkiln.plugins.bench.models import FLUX_DEV, WEIGHT_SCALE
from fluxkiln.plugins.train.flow import flow_loss

REAL_SDPA = F.scaled_dot_product_attention


class _GradLike(torch.autograd.Function):
    """Identity whose backward hands on the gradient in the layout the forward output had."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.stride = x.shape, x.stride()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        out = torch.empty_strided(ctx.shape, ctx.stride, dtype=g.dtype, device=g.device)
        return out.copy_(g)


def _qkv(args, kw):
    """SDPA's query, key, value however they were passed (diffusers passes them by keyword), and the rest."""
    names = ("query", "key", "value")
    qkv = list(args[:3]) + [kw.pop(n) for n in names[len(args[:3]):]]
    return qkv, args[3:], kw


def sdpa_grad_like(*args, **kw):
    (q, k, v), rest, kw = _qkv(args, dict(kw))
    return _GradLike.apply(REAL_SDPA(q, k, v, *rest, **kw))


def sdpa_contiguous(*args, **kw):
    (q, k, v), rest, kw = _qkv(args, dict(kw))
    return _GradLike.apply(REAL_SDPA(q.contiguous(), k.contiguous(), v.contiguous(), *rest, **kw))


VARIANTS = {
    "flash": ([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], REAL_SDPA),
    "cudnn": ([SDPBackend.CUDNN_ATTENTION], REAL_SDPA),
    "cudnn_grad_like_out": ([SDPBackend.CUDNN_ATTENTION], sdpa_grad_like),
    "cudnn_contiguous_qkv": ([SDPBackend.CUDNN_ATTENTION], sdpa_contiguous),
}


def model():
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        t = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16)
    with torch.no_grad():
        for p in t.parameters():
            p.mul_(WEIGHT_SCALE)
    t.requires_grad_(False)
    names = [f"{lst}.{i}.{n}" for lst in ("transformer_blocks", "single_transformer_blocks")
             for i, b in enumerate(getattr(t, lst)) for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)]
    t.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=names, init_lora_weights="gaussian"))
    params = [p for n, p in t.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.to(torch.bfloat16)
        p.requires_grad_(True)
    t.train()
    return t, params


def main(out_path: str, only: str | None = None) -> None:
    t, params = model()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 128, 128, generator=gen)
    embeds = torch.randn(1, 512, 4096, generator=gen).cuda().bfloat16()
    pooled = torch.randn(1, 768, generator=gen).cuda().bfloat16()
    results, ref = {}, None
    for name, (backends, fn) in VARIANTS.items():
        if only and name not in only.split(","):
            continue
        F.scaled_dot_product_attention = fn
        try:
            stamps, grads = [], None
            for step in range(6):
                step_gen = torch.Generator().manual_seed(step)
                with sdpa_kernel(backends):
                    loss = flow_loss(t, latents, embeds, pooled, step_gen, "sigmoid", torch.device("cuda"),
                                     torch.bfloat16)
                    loss.backward()
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                if step == 0:
                    grads = torch.cat([p.grad.float().flatten() for p in params]).cpu()
                for p in params:
                    p.grad = None
            per = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
            diff = None if ref is None else float((grads - ref).norm() / ref.norm())
            ref = grads if ref is None else ref
            results[name] = {"s_per_fwd_bwd": round(per, 4), "grad_rel_diff_vs_flash": diff}
        except RuntimeError as exc:
            results[name] = {"error": str(exc).splitlines()[0][:300]}
        finally:
            F.scaled_dot_product_attention = REAL_SDPA
        print(name, results[name], flush=True)
    with open(out_path, "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, fh, indent=2)
    print(f"{'variant':<24}{'s/fwd+bwd':>10}  grad Δ / error")
    for name, r in results.items():
        print(f"{name:<24}{r.get('s_per_fwd_bwd', '-'):>10}  {r.get('grad_rel_diff_vs_flash', r.get('error'))}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
