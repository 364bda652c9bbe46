"""Experiment: what the first transformer call of a process costs, compiling the blocks the ordinary way or ahead
of time (saved for later processes), with and without the first single-stream block's joined input layout, and
what a later process pays when the variants are saved.  Run on the GPU machine:
``python bench/cold_compile.py OUT.json [MODE ...]``; random weights, 5 double and 10 single full-size blocks,
``go_fast``'s fp8 layers and fused QKV, 1024² (4,096 image and 512 text tokens), bf16.

Each mode runs in a fresh process and times four calls of the transformer.  Modes: ``regular`` (ordinary
torch.compile, ``FLUXKILN_PRECOMPILE=0``) and ``ahead`` (compiled ahead of time and saved, the default), each with
``-nojoin`` (every single-stream block's own layout: the first compiles a variant of its own) and ``-graphed``
(whole-step CUDA graphs, as ``sample`` runs); a cold cache for each, except ``-warminductor`` (Inductor's cache of
the mode before, nothing saved precompiled) and ``-loaded`` (the variants the mode before saved)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

MODES = ("regular-nojoin", "regular", "ahead", "ahead-nojoin", "ahead-warminductor", "ahead-loaded")
CACHE = "/tmp/fk-cold-compile"


def child(mode: str) -> dict:
    """One process: build the transformer, compile its blocks, time four calls."""
    if mode.startswith("regular"):
        os.environ["FLUXKILN_PRECOMPILE"] = "0"
    import torch
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.utils import calculate_time_spent

    from fluxkiln.plugins.flux import fast, graphed, joined, precompiled

    if "nojoin" in mode:
        joined.install = lambda blocks: None
    with torch.device("cuda"):
        tr = FluxTransformer2DModel(num_layers=5, num_single_layers=10, guidance_embeds=True).to(torch.bfloat16)
    tr.eval().fuse_qkv_projections()
    fast.fp8_apply(tr)
    g = torch.Generator("cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    inputs = dict(hidden_states=randn(1, 4096, 64), encoder_hidden_states=randn(1, 512, 4096),
                  pooled_projections=randn(1, 768), timestep=torch.tensor([0.5], device="cuda"),
                  guidance=torch.tensor([3.5], device="cuda"), img_ids=torch.zeros(4096, 3, device="cuda"),
                  txt_ids=torch.zeros(512, 3, device="cuda"), return_dict=False)
    fast.compile_blocks(tr)
    if "graphed" in mode:
        graphed.install(tr)
    walls = []
    with torch.no_grad(), fast.attention_first_cudnn():
        for _ in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tr(**inputs)
            torch.cuda.synchronize()
            walls.append(round(time.perf_counter() - t0, 3))
    return {"mode": mode, "calls_s": walls, "compile": fast.compile_seconds(), "precompiled": precompiled.stats(),
            "torch_spent_s": {k: round(v, 2) for k, v in calculate_time_spent().items()}}


def main(out: str, modes: list[str]) -> None:
    rows = []
    for mode in modes:
        if not mode.endswith(("-warminductor", "-loaded")):
            shutil.rmtree(CACHE, ignore_errors=True)
        elif mode.endswith("-warminductor"):
            shutil.rmtree(os.path.join(CACHE, "precompiled"), ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True,
                              env={**os.environ, "FLUXKILN_CACHE": CACHE}, timeout=300)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"mode": mode, "error": proc.stderr[-2000:]})
        with open(out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    print(f"{'mode':24} {'first call s':>12} {'compile s':>10} {'Inductor s':>10} {'saved':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:24} failed: {r['error'][-200:]}")
            continue
        c = r["compile"]
        print(f"{r['mode']:24} {r['calls_s'][0]:12.2f} {c.get('compile', 0):10.2f} {c.get('inductor', 0):10.2f} "
              f"{len(r['precompiled']['saved']):6d}")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
    else:
        main(sys.argv[1], sys.argv[2:] or list(MODES))
