"""Attention kernels at FLUX.1's 1024² shape on a GPU: time per call and error against a float32 reference.

    python bench/attn_probe.py [--out FILE] [--tokens 4608] [--heads 24] [--plain-inputs]

Rows: PyTorch's scaled_dot_product_attention with its default choice, then restricted to cuDNN, flash and
memory-efficient; SageAttention 1 (INT8 Q·K, FP16 P·V, a Triton kernel; the ``sageattention`` wheel) when
it is importable; and cuDNN's fused fp8 attention as go_fast calls it (``nvidia-cudnn-frontend``), the kernel
alone on inputs already in fp8 and with the quantization around it. Inputs are random with the spread of real
FLUX activations' after RMS-norm and RoPE (unit variance, a few large channels), so the error column means
something for the lossy rows; ``--plain-inputs`` leaves out the large channels.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def inputs(batch: int, heads: int, tokens: int, dim: int, plain: bool = False) -> tuple[Any, Any, Any]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, tokens, dim)
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) for _ in range(3))
    if not plain:  # a few outlier channels in the keys, as in real models (what SageAttention's key smoothing is for)
        k[..., :4] += 6.0
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def timed(fn: Any, repeats: int = 30) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def kernels(q: Any, k: Any, v: Any) -> dict[str, Any]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend: Any = None) -> Any:
        def run() -> Any:
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    found = {"sdpa default": sdpa(), "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
             "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    try:
        from sageattention import sageattn
    except ImportError as err:
        print(f"[attn] sageattention not importable: {err}")
    else:
        found["sage1 int8 qk"] = lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    found.update(fp8_rows(q, k, v))
    return found


def fp8_rows(q: Any, k: Any, v: Any) -> dict[str, Any]:
    """cuDNN's fp8 attention as go_fast calls it: (batch, tokens, heads, dim) in, the output turned back to
    (batch, heads, tokens, dim) for the comparison; empty where it cannot run here."""
    from fluxkiln.plugins.flux import fp8_attention as fa

    ok, why = fa.supported()
    if not ok:
        print(f"[attn] cuDNN fp8 attention not available: {why}")
        return {}
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    (q8, dq), (k8, dk), (v8, dv) = fa.quantize(qs), fa.quantize(ks), fa.quantize(vs)
    so = 1.0 / dv

    def kernel() -> Any:  # timed alone: its fp8 output is turned back for the error only
        return fa.fp8_sdpa(q8, k8, v8, dq, dk, dv, so)

    kernel.to_attention = lambda out: (out.float() * dv).transpose(1, 2)  # what main() compares
    return {"cudnn fp8 (kernel)": kernel,
            "cudnn fp8 (with quantization)": lambda: fa.attention(qs, ks, vs).transpose(1, 2)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--tokens", type=int, default=4608)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--plain-inputs", action="store_true", help="no large key channels")
    args = ap.parse_args()
    q, k, v = inputs(1, args.heads, args.tokens, args.dim, args.plain_inputs)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * args.heads * args.tokens**2 * args.dim
    rows = {}
    for name, fn in kernels(q, k, v).items():
        try:
            out = getattr(fn, "to_attention", lambda o: o)(fn())  # a row's output as attention's
            ms = timed(fn)
        except Exception as err:  # noqa: BLE001 - a kernel that cannot run here is a row, not the end
            rows[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            continue
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        rows[name] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "rel_err": round(rel, 5)}
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [1, args.heads, args.tokens,
              args.dim], "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("| kernel | ms | TFLOPS | rel. error |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r.get('ms', '-')} | {r.get('tflops', '-')} | {r.get('rel_err', r.get('error'))} |")


if __name__ == "__main__":
    main()
