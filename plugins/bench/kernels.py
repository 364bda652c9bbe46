"""What the hardware gives at FLUX's 1024² shapes: attention per SDPA backend and bf16 vs fp8 GEMMs."""

from __future__ import annotations

from typing import Any


def kernel_probe(device: str) -> dict[str, Any]:
    """What the hardware gives at FLUX's 1024² shapes: attention per SDPA backend, bf16 vs fp8 GEMM."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fluxkiln.plugins.flux.fast import fp8_linear_class

    def clock(fn: Any, n: int = 10) -> float:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(n):
            fn()
        t1.record()
        torch.cuda.synchronize()
        return t0.elapsed_time(t1) / n / 1000

    out: dict[str, Any] = {}
    q, k, v = (torch.randn(1, 24, 4608, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn_like(q)
    flops = 4 * 4608 * 4608 * 128 * 24
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                s = clock(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            out[f"attention_{name.lower()}"] = {"ms": round(s * 1e3, 3), "tflops": round(flops / s / 1e12, 1)}
            with sdpa_kernel(getattr(SDPBackend, name)):
                s = clock(lambda: torch.nn.functional.scaled_dot_product_attention(qg, kg, vg).backward(dout))
            out[f"attention_{name.lower()}_fwd_bwd"] = {"ms": round(s * 1e3, 3),
                                                        "tflops": round(3.5 * flops / s / 1e12, 1)}
        except RuntimeError as exc:
            out[f"attention_{name.lower()}"] = f"unavailable: {str(exc).splitlines()[0][:120]}"
    x = torch.randn(4608, 3072, device=device, dtype=torch.bfloat16)
    lin = torch.nn.Linear(3072, 12288, device=device, dtype=torch.bfloat16)
    gemm = 2 * 4608 * 3072 * 12288
    with torch.no_grad():
        s = clock(lambda: lin(x))
        out["gemm_bf16_4608x3072x12288"] = {"ms": round(s * 1e3, 3), "tflops": round(gemm / s / 1e12, 1)}
        f8 = fp8_linear_class()(lin)
        s = clock(lambda: f8(x))
        out["gemm_fp8_rowwise_eager_incl_quant"] = {"ms": round(s * 1e3, 3), "tflops": round(gemm / s / 1e12, 1)}
        xq = x.to(torch.float8_e4m3fn)
        ones = torch.ones(4608, 1, device=device)
        s = clock(lambda: torch._scaled_mm(xq, f8.weight_fp8.t(), scale_a=ones, scale_b=f8.weight_scale,
                                           out_dtype=torch.bfloat16))
        out["gemm_fp8_rowwise_matmul_only"] = {"ms": round(s * 1e3, 3), "tflops": round(gemm / s / 1e12, 1)}
        out["gemm_fp8_shapes"] = fp8_shapes(clock, device)
    return out


# (tokens, in, out) of the block linears go_fast computes in fp8, for one 1024² image: the double blocks'
# image stream (4,096 tokens) and text stream (512), the single blocks' 4,608.
FLUX_LINEARS = {"double_img_qkv": (4096, 3072, 3072), "double_img_ff_up": (4096, 3072, 12288),
                "double_img_ff_down": (4096, 12288, 3072), "double_txt_ff_up": (512, 3072, 12288),
                "single_mlp": (4608, 3072, 12288), "single_out": (4608, 15360, 3072)}


def fp8_shapes(clock: Any, device: str) -> dict[str, Any]:
    """Each FLUX block linear's fp8 matmul with fluxkiln's row scales, accumulating in full precision and with
    fast accumulation (``use_fast_accum``), against bf16."""
    import torch

    out: dict[str, Any] = {}
    for name, (m, k, n) in FLUX_LINEARS.items():
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        aq, wq = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sa, sw = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
        flops = 2 * m * k * n
        row: dict[str, Any] = {"bf16_ms": round(clock(lambda: a @ w.t()) * 1e3, 4)}
        for fast in (False, True):
            s = clock(lambda: torch._scaled_mm(aq, wq.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16,
                                               use_fast_accum=fast))
            row[f"fp8{'_fast' if fast else ''}_ms"] = round(s * 1e3, 4)
            row[f"fp8{'_fast' if fast else ''}_tflops"] = round(flops / s / 1e12, 1)
        out[name] = row
    return out
