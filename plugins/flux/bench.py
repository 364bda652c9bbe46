"""``fluxkiln bench``: time fluxkiln's real ``load_model -> sample`` and ``train_lora`` paths against stock
diffusers / peft in the same process on the same work, and measure how far each fast path's output is
from the bf16 eager one.

Without weights (``--random-weights``, the default) the full-size FLUX.1-dev and -schnell architectures
are built from their configs with random weights directly on the GPU (the two transformers share their
blocks); a config-only folder stands for each model, and the pipeline is put into the Engine's residency
under exactly the key ``load_model`` computes for that folder, so the recipes run unchanged through
:class:`~fluxkiln.engine.runner.Engine`.  ``--tiny`` runs the same code on the tiny built-in model (CI).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .benchparts import (SCHEDULERS, block_inputs, block_output, build_full_size, cache_store_seconds,
                         guard_inputs, kernel_probe, rel_diff, render_table, targets, write_config_folder)
from .benchprofile import kernel_breakdown, stage_times
from .benchtrain import CONFIGS as TRAIN_CONFIGS
from .benchtrain import training

HELP = "benchmark sampling and LoRA training (fluxkiln vs stock diffusers/peft) on this machine"
PROMPT = "a lighthouse on a cliff at dusk, volumetric light, 35mm photo"
CONFIGS = ("dev-lossless", "dev-go_fast", "schnell-go_fast")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fluxkiln bench", description=HELP)
    p.add_argument("--random-weights", action="store_true", default=True,
                   help="full-size FLUX.1 shapes with random weights (default; nothing is downloaded)")
    p.add_argument("--tiny", action="store_true", help="the tiny built-in model instead (CPU-sized; for CI)")
    p.add_argument("--only", choices=["sample", "train"], help="run one part only")
    p.add_argument("--configs", default=",".join(CONFIGS), help="sampling configurations, comma-separated: "
                   + ", ".join(CONFIGS))
    p.add_argument("--train-configs", default=",".join(TRAIN_CONFIGS), help="training configurations, "
                   "comma-separated: " + ", ".join(TRAIN_CONFIGS))
    p.add_argument("--no-stock", action="store_true", help="skip the stock diffusers/peft baselines")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 2; tiny 1)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps per configuration (default 8)")
    p.add_argument("--train-resolution", type=int, default=None, help="training resolution (default 1024)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here (default bench.json)")
    return p


class Bench:
    """One benchmark session: the pipelines, the Engine, and the results (written as they come)."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.tiny = args.tiny
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.size = 256 if self.tiny else 1024
        self.steps = {"dev": 4, "schnell": 2} if self.tiny else {"dev": 28, "schnell": 4}
        self.repeats = args.repeats or (1 if self.tiny else 2)
        self.train_steps = args.train_steps or (4 if self.tiny else 8)
        self.train_res = args.train_resolution or (64 if self.tiny else 1024)
        self.out = args.out or Path("bench.json")
        self.work = Path(tempfile.mkdtemp(prefix="fluxkiln-bench-"))
        self.results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "mode": "tiny" if self.tiny else
                                        "random-weights", "device": self.device, "sample": {}, "train": {},
                                        "errors": []}
        self.pipes: dict[str, Any] = {}
        self.refs: dict[str, str] = {}
        self.guards: dict[str, tuple[dict[str, Any], Any]] = {}
        self.block_guards: dict[str, tuple[dict[str, Any], Any]] = {}
        self.stock_images: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch
        from diffusers import __version__ as dv

        from fluxkiln.engine.runner import Engine

        from .load import Source, model_key, pipeline_bytes

        info = self.results
        info.update(torch=torch.__version__, diffusers=dv,
                    gpu=torch.cuda.get_device_name() if self.device == "cuda" else "cpu")
        t0 = time.perf_counter()
        self.pipes = self._build()
        info["build_s"] = round(time.perf_counter() - t0, 2)
        self.engine = Engine(cache_dir=self.work / "cache")
        for variant, pipe in self.pipes.items():
            pipe._fluxkiln_offload, pipe._fluxkiln_dtype = "none", pipe.transformer.dtype
            pipe.set_progress_bar_config(disable=True)
            folder = write_config_folder(self.work / "models" / f"flux-{variant}", pipe)
            key = model_key(Source("folder", folder.resolve(), str(folder)), "auto", "none", "none", self.device)
            # no release function: the bench owns these pipelines (and the two share their blocks)
            self.engine.models.put(key, pipe, size=pipeline_bytes(pipe), kind="inference")
            self.refs[variant] = str(folder.resolve())
        info["residency_keys"] = self.engine.models.keys()

    def _build(self) -> dict[str, Any]:
        if not self.tiny:
            return build_full_size(self.device)
        from .tiny import build_tiny_flux

        return {v: build_tiny_flux(v).to(self.device) for v in ("dev", "schnell")}

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str))

    def guarded(self, what: str, fn: Any, *a: Any) -> Any:
        """Run one part; a failure is recorded and the rest of the benchmark still runs."""
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - report any failure of one part, measure the rest
            self.results["errors"].append({"part": what, "error": f"{type(exc).__name__}: {exc}",
                                           "trace": traceback.format_exc()[-3000:]})
            print(f"[bench] {what} FAILED: {type(exc).__name__}: {exc}", flush=True)
            return None
        finally:
            self.save()

    # ------------------------------------------------------------------ timing helpers
    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device == "cuda" else None

    def peak_reserved_gib(self) -> float | None:
        import torch

        return round(torch.cuda.max_memory_reserved() / 2**30, 2) if self.device == "cuda" else None

    def call_args(self, variant: str) -> dict[str, Any]:
        """What ``sample`` passes the pipeline (same seed, guidance and text length)."""
        import torch

        from .sample import DEFAULT_GUIDANCE, MAX_TEXT_TOKENS

        return dict(prompt=PROMPT, num_images_per_prompt=1, width=self.size, height=self.size,
                    num_inference_steps=self.steps[variant], max_sequence_length=MAX_TEXT_TOKENS[variant],
                    guidance_scale=DEFAULT_GUIDANCE if variant == "dev" else 0.0, output_type="pil",
                    generator=[torch.Generator("cpu").manual_seed(7)])

    def attention(self) -> Any:
        """The attention priority ``sample`` uses on a GPU (so bare calls do the same work)."""
        import contextlib

        from . import fast

        return fast.attention_first_cudnn() if self.device == "cuda" else contextlib.nullcontext()

    def bare_call(self, variant: str) -> tuple[float, Any]:
        import torch

        pipe = self.pipes[variant]
        self.sync()
        t0 = time.perf_counter()
        with torch.no_grad(), self.attention():
            images = pipe(**self.call_args(variant)).images
        self.sync()
        return time.perf_counter() - t0, images[0]

    # ------------------------------------------------------------------ sampling
    def reference(self, variant: str) -> None:
        """Eager bf16 reference: one transformer forward (quality guard) and stock FluxPipeline timings."""
        import torch
        from diffusers import FluxPipeline

        pipe = self.pipes[variant]
        inputs = guard_inputs(pipe, self.size, variant, self.device)
        with torch.no_grad():
            ref = pipe.transformer(**inputs, return_dict=False)[0].float().cpu()
            again = pipe.transformer(**inputs, return_dict=False)[0].float().cpu()
        self.guards[variant] = (inputs, ref)
        blocks_in = block_inputs(pipe, inputs)
        self.block_guards[variant] = (blocks_in, block_output(pipe, blocks_in))
        self.results.setdefault("eager_noise_floor", {})[variant] = {"transformer_rel_diff": rel_diff(again, ref)}
        if self.args.no_stock:
            return
        stock = FluxPipeline(**pipe.components)
        stock.set_progress_bar_config(disable=True)
        self.reset_peak()
        runs, images = [], []
        for _ in range(1 + self.repeats):
            self.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                images.append(stock(**self.call_args(variant)).images[0])
            self.sync()
            runs.append(time.perf_counter() - t0)
        self.stock_images[variant] = images[-1]
        self.results["eager_noise_floor"][variant]["image_rel_diff"] = rel_diff(images[0], images[-1])
        per = statistics.median(runs[1:])
        self.results["sample"][f"{variant}-stock"] = {
            "what": "stock diffusers FluxPipeline, eager bf16, same text encoders", "steps": self.steps[variant],
            "s_per_image": round(per, 3), "s_per_step": round(per / self.steps[variant], 4),
            "runs_s": [round(r, 3) for r in runs], "warmup_s": round(runs[0], 3), "peak_gib": self.peak_gib(),
            "stages_s": stage_times(stock, lambda: stock(**self.call_args(variant)), self.sync)}
        if self.device == "cuda":
            self.results["sample"][f"{variant}-stock"]["gpu_step"] = kernel_breakdown(
                lambda: pipe.transformer(**inputs, return_dict=False), self.work / "profile" / f"{variant}-stock")
        print(f"[bench] {variant}-stock: {per:.3f} s/image", flush=True)

    def recipe(self, variant: str, go_fast: bool) -> Path:
        path = self.work / f"sample-{variant}-{'fast' if go_fast else 'lossless'}.toml"
        guidance = "" if variant == "schnell" else "guidance = 3.0\n"
        path.write_text(f'''[recipe]
name = "bench-{variant}"

[nodes.base]
type = "load_model"
model = {json.dumps(self.refs[variant])}

[nodes.images]
type = "sample"
model = "@base"
prompt = {json.dumps(PROMPT)}
aspect_ratio = "custom"
width = {self.size}
height = {self.size}
num_inference_steps = {self.steps[variant]}
{guidance}seed = 7
go_fast = {str(go_fast).lower()}
''')
        return path

    def engine_run(self, recipe: Path) -> tuple[float, float, Any]:
        """One ``fluxkiln run`` of the recipe: (wall seconds, sample node seconds, first image)."""
        self.sync()
        t0 = time.perf_counter()
        result = self.engine.run(recipe, force=["images"], output=self.work / "runs" / recipe.stem)
        self.sync()
        wall = time.perf_counter() - t0
        if not result.ok:
            failed = [e.data for e in result.events if e.event == "node_failed"]
            raise RuntimeError(f"recipe {recipe.name} failed: {failed}")
        node_s = next(e.data["seconds"] for e in result.events if e.event == "node_finished" and e.node == "images")
        return wall, node_s, result.outputs["images"]["output"][0].image

    def fluxkiln_sample(self, name: str) -> None:
        import torch

        from .pipestate import state_of

        variant, mode = name.split("-")
        pipe = self.pipes[variant]
        recipe = self.recipe(variant, mode == "go_fast")
        self.reset_peak()
        runs = [self.engine_run(recipe) for _ in range(1 + self.repeats)]
        peak = self.peak_gib()
        walls, nodes = [r[0] for r in runs], [r[1] for r in runs]
        per, node_per = statistics.median(walls[1:]), statistics.median(nodes[1:])
        bare, _ = self.bare_call(variant)
        inputs, ref = self.guards[variant]
        with torch.no_grad(), self.attention():
            got = pipe.transformer(**inputs, return_dict=False)[0].float().cpu()
            block_in, block_ref = self.block_guards[variant]
            got_block = block_output(pipe, block_in)
        st = state_of(pipe)
        row = {"what": f"fluxkiln sample node through Engine.run, go_fast={mode == 'go_fast'}",
               "steps": self.steps[variant], "s_per_image": round(per, 3),
               "s_per_step": round(per / self.steps[variant], 4), "runs_s": [round(w, 3) for w in walls],
               "first_run_s": round(walls[0], 2), "compile_warmup_s": round(walls[0] - per, 2), "peak_gib": peak,
               "fast_paths": {"compiled_blocks": st.compiled, "fused_qkv": st.qkv_fused, "fp8": st.fp8,
                              "compiled_vae": st.vae_compiled},
               "transformer_rel_diff": rel_diff(got, ref), "block_rel_diff": rel_diff(got_block, block_ref),
               "engine": {"run_s": round(per, 3), "node_s": round(node_per, 3), "bare_pipeline_s": round(bare, 3),
                          "overhead_run_pct": round(100 * (per / bare - 1), 2),
                          "overhead_node_pct": round(100 * (node_per / bare - 1), 2), **cache_store_seconds(runs[-1][2])}}
        row["stages_s"] = stage_times(pipe, lambda: self.bare_call(variant), self.sync)
        if self.device == "cuda":
            row["gpu_step"] = self.step_profile(pipe, inputs, name)
        stock = self.results["sample"].get(f"{variant}-stock")
        if stock:
            row["ratio_to_stock"] = round(per / stock["s_per_image"], 3)
            row["image_rel_diff"] = rel_diff(runs[-1][2], self.stock_images[variant])
        self.results["sample"][name] = row
        print(f"[bench] {name}: {per:.3f} s/image (first {walls[0]:.1f} s), diff {row['transformer_rel_diff']}",
              flush=True)

    def step_profile(self, pipe: Any, inputs: dict[str, Any], name: str) -> dict[str, Any]:
        """GPU kernel time by kind in one transformer forward (what limits a denoising step)."""
        import torch

        def forward() -> None:
            with torch.no_grad(), self.attention():
                pipe.transformer(**inputs, return_dict=False)

        return kernel_breakdown(forward, self.work / "profile" / name)

    def reset(self, variant: str) -> None:
        """Back to eager bf16 (the two full-size pipelines share their blocks)."""
        from .pipestate import prepare

        prepare(self.pipes[variant], [], False, self.device, lambda _a: {})

    def sampling(self) -> None:
        wanted = configs(self.args)
        if self.device == "cuda":
            self.results["kernels"] = self.guarded("kernel-probe", kernel_probe, self.device)
        for variant in ("dev", "schnell"):
            mine = [c for c in wanted if c.startswith(variant + "-")]
            if not mine:
                continue
            self.guarded(f"{variant}-reference", self.reference, variant)
            for name in mine:
                if variant in self.guards:
                    self.guarded(name, self.fluxkiln_sample, name)
            self.guarded(f"{variant}-reset", self.reset, variant)


def configs(args: argparse.Namespace, field: str = "configs") -> list[str]:
    return [c.strip() for c in getattr(args, field).split(",") if c.strip()]


def main(argv: list[str]) -> int:
    parser = parse(argv)
    args = parser.parse_args(argv)
    for flag, given, known in (("--configs", configs(args), CONFIGS),
                               ("--train-configs", configs(args, "train_configs"), TRAIN_CONFIGS)):
        bad = [c for c in given if c not in known]
        if bad:
            parser.error(f"unknown {flag} {', '.join(bad)}; choose from {', '.join(known)}")
    bench = Bench(args)
    try:
        bench.setup()
        if args.only in (None, "sample"):
            bench.sampling()
        if args.only in (None, "train"):
            bench.guarded("training", training, bench, configs(args, "train_configs"))
        bench.results["targets"] = targets(bench.results)
        bench.save()
        print(render_table(bench.results))
        print(f"results: {bench.out}")
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    return 1 if bench.results["errors"] else 0


__all__ = ["HELP", "SCHEDULERS", "main"]
