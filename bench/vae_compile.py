"""Experiment: what compiling FLUX.1's VAE decoder costs the first time (cold caches) and per new image size,
for three ways of compiling it.  One variant per process, each with empty Inductor/Triton caches:
``python bench/vae_compile.py OUT.json whole|dynamic|regional``.  Random weights."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

SIZES = [(128, 128), (96, 170)]  # latents of 1024x1024 and 768x1360


def main(out_path: str, variant: str) -> None:
    cache = tempfile.mkdtemp(prefix="vae-compile-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    import torch
    from diffusers import AutoencoderKL

    from fluxkiln.plugins.bench.models import VAE_FULL

    with torch.device("cuda"):
        vae = AutoencoderKL(**VAE_FULL).to(torch.bfloat16).eval().requires_grad_(False)
    if variant == "whole":
        vae.decoder.compile(dynamic=False)
    elif variant == "dynamic":
        vae.decoder.compile(dynamic=True)
    else:  # regional: each resnet, attention and upsampler on its own
        for module in vae.decoder.modules():
            if type(module).__name__ in ("ResnetBlock2D", "Upsample2D", "Attention"):
                module.compile(dynamic=False)
    res: dict[str, float] = {}
    with torch.no_grad():
        for h, w in SIZES:
            z = torch.randn(1, 16, h, w, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            vae.decode(z)
            torch.cuda.synchronize()
            res[f"first_{h * 8}x{w * 8}_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(5):
                vae.decode(z)
            torch.cuda.synchronize()
            res[f"decode_{h * 8}x{w * 8}_s"] = (time.perf_counter() - t0) / 5
    res = {k: round(v, 4) for k, v in res.items()}
    with open(out_path, "w") as fh:
        json.dump({"variant": variant, "gpu": torch.cuda.get_device_name(), "seconds": res}, fh, indent=2)
    print(variant, res)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
