"""``fluxkiln bench``'s training part: ``train_lora`` through the Engine in each memory setting, beside a plain
peft loop on the same work.

Settings: no checkpointing, checkpointing every block, every second block, and the 24 GB-card setup (fp8-stored
base weights, model offload, checkpointing) run under a cap of :data:`CARD_GIB` on the GPU's allocator
(``--card-gib``), so exceeding a 24 GB card's room fails instead of passing unnoticed.
``fp8_ckpt_24gb_layerwise`` (on request, in a run of its own: diffusers cannot take its casting off again) is
that setup with the fp8 storage fluxkiln used before its own layers: diffusers' layerwise casting, whose hooks
keep the blocks eager.  ``--train-profile`` adds to each row one more run under ``torch.profiler``: the GPU's
busy and idle time over its last steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .session import recipe_head

CARD_GIB = 22.0  # what a 24 GB card leaves a process, after the CUDA context and the display
CARD_LOAD = 'quantize = "fp8"\noffload = "model"\n'  # load_model's keys of the 24 GB-card setup
# name -> (gradient checkpointing, interval, 24 GB-card setup)
CONFIGS = {"no_ckpt": (False, 1, False), "ckpt": (True, 1, False), "ckpt_every_2nd": (True, 2, False),
           "fp8_ckpt_24gb_layerwise": (True, 1, True), "fp8_ckpt_24gb": (True, 1, True)}
DEFAULT = ["no_ckpt", "ckpt", "ckpt_every_2nd", "fp8_ckpt_24gb"]
LAYERWISE = "fp8_ckpt_24gb_layerwise"
PROFILED_STEPS = 3  # the last steps of a profiled run that are summarized


def training(bench: Any, wanted: list[str]) -> None:
    """Run the ``wanted`` configurations (in :data:`CONFIGS` order, so the 24 GB card comes last)."""
    import torch

    if bench.device == "cuda":
        torch._dynamo.reset()  # compiled sampling graphs hold no memory training needs
    data = dataset(bench)
    for name, (ckpt, _interval, card) in CONFIGS.items():
        if name not in wanted:
            continue
        if card and bench.device != "cuda":
            bench.results["train"][name] = {"skipped": "needs a CUDA GPU (fp8 storage, model offload)"}
            continue
        bench.guarded(f"train-{name}", fluxkiln_train, bench, name, data)
        if name in ("no_ckpt", "ckpt") and not bench.args.no_stock:
            bench.guarded(f"train-{name}-stock", stock_row, bench, name, ckpt)


def dataset(bench: Any) -> Path:
    from PIL import Image

    folder = bench.work / "data"
    folder.mkdir(exist_ok=True)
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (bench.train_res, bench.train_res), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of TOK")
    return folder


def recipe(bench: Any, name: str, data: Path, load_extra: str, steps: int | None = None, suffix: str = "") -> Path:
    ckpt, interval, _card = CONFIGS[name]
    path = bench.work / f"train-{name}{suffix}.toml"
    head = recipe_head(f"bench-train-{name}", {"base": bench.refs["dev"]})
    path.write_text(head + f'''{load_extra}
[nodes.data]
type = "dataset"
source = {json.dumps(str(data))}

[nodes.lora]
type = "train_lora"
model = "@base"
dataset = "@data"
steps = {steps or bench.train_steps}
resolution = [{bench.train_res}]
lora_rank = 16
optimizer = "adamw"
seed = {42 + len(name)}
caption_dropout_rate = 0.0
gradient_checkpointing = {str(ckpt).lower()}
gradient_checkpointing_interval = {interval}
save_every = 0
export_formats = ["diffusers"]
''')
    return path


def to_24gb_card(bench: Any, layerwise: bool) -> str:
    """Put the dev pipeline in the 24 GB-card setup (fp8 weights, model offload); returns its load options.

    Last in the run: the two full-size pipelines share their blocks, which stay fp8 from here on (their
    timing does not depend on the rounded values).  ``layerwise``: diffusers' layerwise casting instead of
    fluxkiln's fp8 layers.
    """
    import torch

    from fluxkiln.plugins.flux import fast
    from fluxkiln.plugins.flux.load import Source, model_key, pipeline_bytes, store_fp8

    pipe = bench.pipes["dev"]
    t = pipe.transformer
    fast.uncompile_blocks(t)
    dtype = pipe._fluxkiln_dtype
    if layerwise:
        t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        pipe._fluxkiln_fp8 = "diffusers layerwise casting (fluxkiln's fp8 storage before its own layers)"
    else:
        pipe._fluxkiln_fp8 = store_fp8(pipe, dtype)
    pipe.enable_model_cpu_offload()
    pipe._fluxkiln_offload = "model"
    folder = Path(bench.refs["dev"])
    key = model_key(Source("folder", folder, str(folder)), "auto", "model", "fp8", bench.device)
    bench.engine.models.put(key, pipe, size=pipeline_bytes(pipe), kind="inference")
    return CARD_LOAD


def card_gib(bench: Any) -> float:
    """The allocator cap of the 24 GB card's rows: ``--card-gib``, else :data:`CARD_GIB`."""
    return getattr(bench.args, "card_gib", None) or CARD_GIB


def fluxkiln_train(bench: Any, name: str, data: Path) -> None:
    ckpt, interval, card = CONFIGS[name]
    path = recipe(bench, name, data, to_24gb_card(bench, name == LAYERWISE) if card else "")
    run_dir = bench.work / "runs" / path.stem
    bench.reset_peak()
    result = _run(bench, path, run_dir, name)
    if not result.ok:
        raise RuntimeError(f"train_lora failed: {[e.data for e in result.events if e.event == 'node_failed']}")
    trained = [e for e in result.events if e.event == "node_progress" and e.node == "lora"
               and (e.data.get("metrics") or {}).get("loss") is not None]
    if len(trained) != bench.train_steps:
        raise RuntimeError(f"train_lora ran {len(trained)} of {bench.train_steps} steps (resumed a checkpoint?)")
    rows = [line.split(",") for line in (run_dir / "lora" / "metrics.csv").read_text().splitlines()[1:]]
    secs = [float(r[3]) for r in rows]
    per = per_step(secs)
    bench.results["train"][name] = {
        "what": f"fluxkiln train_lora through Engine.run, rank 16, {bench.train_res}px, gradient_checkpointing={ckpt}"
                f" (every {interval}. block)" + (f", fp8 base, model offload, allocator capped at {card_gib(bench)} GiB"
                                                 if card else ""),
        "s_per_step": round(per, 4), "first_step_s": round(secs[0], 2), "peak_gib": bench.peak_gib(),
        "peak_reserved_gib": bench.peak_gib("reserved"), "steps": len(secs)}
    print(f"[bench] train {name}: {per:.3f} s/step, peak {bench.peak_gib()} GiB", flush=True)
    if getattr(bench.args, "train_profile", False):
        bench.results["train"][name]["profile"] = profiled(bench, data, run_dir, name)


def _run(bench: Any, path: Path, run_dir: Path, name: str) -> Any:
    """One forced training run of the recipe (the 24 GB card's rows under the allocator cap; the layerwise row
    eager, as its hooks need)."""
    import os
    from unittest import mock

    import torch

    card = CONFIGS[name][2]
    eager = {"FLUXKILN_COMPILE": "0"} if name == LAYERWISE else {}
    if card:
        torch.cuda.set_per_process_memory_fraction(card_gib(bench) * 2**30 /
                                                   torch.cuda.get_device_properties(0).total_memory)
    try:
        with mock.patch.dict(os.environ, eager):
            return bench.engine.run(path, force=["lora"], output=run_dir)
    finally:
        if card:
            torch.cuda.set_per_process_memory_fraction(1.0)


def profiled(bench: Any, data: Path, run_dir: Path, name: str) -> dict[str, Any]:
    """The same training again, :data:`PROFILED_STEPS` + 1 steps, under ``torch.profiler`` (a whole run's
    trace takes minutes to write): kernels over the last :data:`PROFILED_STEPS` steps."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    short = recipe(bench, name, data, CARD_LOAD if CONFIGS[name][2] else "", steps=PROFILED_STEPS + 1,
                   suffix="-profiled")  # one step before them
    cuda = [ProfilerActivity.CUDA] if bench.device == "cuda" else []  # a CPU run: no kernels, "idle" throughout
    with profile(activities=[ProfilerActivity.CPU, *cuda]) as prof:
        result = _run(bench, short, run_dir.with_name(run_dir.name + "-profiled"), name)
    if not result.ok:
        raise RuntimeError("the profiled training run failed")
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
    return step_profile(trace)


def step_profile(trace: dict[str, Any]) -> dict[str, Any]:
    """GPU busy and idle time per step over the last :data:`PROFILED_STEPS` steps marked in ``trace``."""
    from fluxkiln.plugins.train.loop import STEP_MARK

    from .profile import summarize_trace

    steps = sorted((e for e in trace.get("traceEvents", []) if e.get("name") == STEP_MARK and "dur" in e),
                   key=lambda e: e["ts"])[-PROFILED_STEPS:]
    if not steps:
        raise RuntimeError(f"no {STEP_MARK!r} marks in the trace")
    window = (steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"])
    summary = summarize_trace(trace, (window[1] - window[0]) / 1000, window)
    n = len(steps)
    return {"steps": n, "wall_ms_per_step": round(summary["wall_ms"] / n, 1),
            "gpu_busy_ms_per_step": round(summary["busy_ms"] / n, 1), "idle_pct": summary["idle_pct"],
            "kernels_per_step": round(summary["kernels"] / n), "ms_by_kind_per_step":
                {k: round(v / n, 1) for k, v in summary["ms_by_kind"].items()}}


def stock_row(bench: Any, name: str, ckpt: bool) -> None:
    bench.reset_peak()
    per = stock_train(bench.pipes["dev"], ckpt, bench.train_steps, bench.train_res, bench.device)
    bench.results["train"][f"{name}-stock"] = {
        "what": f"stock peft (add_adapter, torch AdamW), same objective, {bench.train_res}px, "
                f"gradient_checkpointing={ckpt}", "s_per_step": round(per, 4), "peak_gib": bench.peak_gib(),
        "peak_reserved_gib": bench.peak_gib("reserved")}
    mine = bench.results["train"].get(name)
    if mine:
        mine["ratio_to_stock"] = round(mine["s_per_step"] / per, 3)


def stock_train(pipe: Any, ckpt: bool, steps: int, res: int, device: str) -> float:
    """Seconds per step of a plain peft LoRA loop (rank 16 on the block linears, torch AdamW, bf16 base)."""
    import time

    import torch
    from peft import LoraConfig

    from fluxkiln.plugins.train.flow import flow_loss

    from fluxkiln.plugins.flux.fast import blocks

    t = pipe.transformer
    names = [f"{lst}.{i}.{n}" for lst in ("transformer_blocks", "single_transformer_blocks")
             for i, b in enumerate(getattr(t, lst)) for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(blocks(t)) > 0
    t.requires_grad_(False)
    t.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=names, init_lora_weights=True),
                  adapter_name="bench_stock")
    params = [p for n, p in t.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    if ckpt:
        t.enable_gradient_checkpointing()
    t.train()
    gen = torch.Generator().manual_seed(0)
    dtype = t.dtype
    latents = torch.randn(1, pipe.vae.config.latent_channels, res // 8, res // 8, generator=gen)
    embeds = torch.randn(1, 512, t.config.joint_attention_dim, generator=gen).to(device, dtype)
    pooled = torch.randn(1, t.config.pooled_projection_dim, generator=gen).to(device, dtype)
    stamps = []
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        for _ in range(steps):
            with sdpa_kernel(backends):
                loss = flow_loss(t, latents, embeds, pooled, gen, "sigmoid", torch.device(device), dtype)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
    finally:
        t.delete_adapters("bench_stock")
        if not getattr(t, "peft_config", None):
            t.unload_lora()
        if ckpt:
            t.disable_gradient_checkpointing()
        t.requires_grad_(False)
        t.eval()
    return per_step(stamps)


def per_step(stamps: list[float]) -> float:
    """Seconds per step from the times each step ended, leaving out the first two (compilation, warm-up)."""
    skip = 2 if len(stamps) > 3 else 0
    return (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip)
