"""Experiment: FLUX.1's VAE decode at 1024² in bf16 — contiguous vs channels-last memory format, eager vs
compiled decoder.  Run on the GPU machine: ``python bench/vae_decode.py OUT.json``; random weights."""

from __future__ import annotations

import json
import sys
import time

import torch

from fluxkiln.plugins.bench.models import VAE_FULL


def clock(fn, n: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main(out_path: str) -> None:
    from diffusers import AutoencoderKL

    with torch.device("cuda"):
        vae = AutoencoderKL(**VAE_FULL).to(torch.bfloat16).eval().requires_grad_(False)
    z = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    res = {}
    with torch.no_grad():
        res["eager_contiguous"] = clock(lambda: vae.decode(z).sample)
        vae.to(memory_format=torch.channels_last)
        res["eager_channels_last"] = clock(lambda: vae.decode(z).sample)
        torch.backends.cudnn.benchmark = True
        res["eager_channels_last_cudnn_benchmark"] = clock(lambda: vae.decode(z).sample)
        vae.to(memory_format=torch.contiguous_format)
        res["eager_contiguous_cudnn_benchmark"] = clock(lambda: vae.decode(z).sample)
        torch.backends.cudnn.benchmark = False
        vae.decoder.compile()
        t0 = time.perf_counter()
        vae.decode(z)
        torch.cuda.synchronize()
        res["compile_s"] = time.perf_counter() - t0
        res["compiled_contiguous"] = clock(lambda: vae.decode(z).sample)
    res = {k: round(v, 4) for k, v in res.items()}
    with open(out_path, "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": res}, fh, indent=2)
    for k, v in res.items():
        print(f"{k:<22}{v:>8.4f} s")


if __name__ == "__main__":
    main(sys.argv[1])
