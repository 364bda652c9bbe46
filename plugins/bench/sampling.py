"""``fluxkiln bench``'s sampling part: stock ``FluxPipeline`` beside fluxkiln's real ``load_model -> sample`` path
through the Engine, per configuration (lossless, go_fast), with the quality guard, per-stage seconds, the GPU kernel
breakdown of one step and the engine's overhead over a bare pipeline call."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .guard import block_inputs, block_output, guard_inputs, rel_diff
from .kernels import kernel_probe
from .overhead import engine_phases, per_run_ms
from .profile import kernel_breakdown, stage_times
from .session import PROMPT, BenchSession, per_image, recipe_head, sample_head

CONFIGS = ("dev-lossless", "dev-go_fast", "schnell-go_fast", "dev-go_fast-cache", "schnell-go_fast-cache",
           "dev-go_fast-graphs", "schnell-go_fast-graphs", "dev-go_fast-nograph", "schnell-go_fast-nograph")
DEFAULT_CONFIGS = CONFIGS[:3]
GRAPHS_MODE = "reduce-overhead"  # "-graphs" rows: each block compiled with CUDA graphs of its own
# "-nograph" rows: whole transformer calls not replayed as CUDA graphs (graphed.py), to show what they give


class SamplingBench:
    """The sampling measurements of one session; keeps each variant's eager reference for the quality guard."""

    def __init__(self, bench: BenchSession):
        self.bench = bench
        self.guards: dict[str, tuple[dict[str, Any], Any]] = {}
        self.block_guards: dict[str, tuple[dict[str, Any], Any]] = {}
        self.stock_images: dict[str, Any] = {}

    def call_args(self, variant: str) -> dict[str, Any]:
        """What ``sample`` passes the pipeline (same seed, guidance and text length)."""
        import torch

        from fluxkiln.plugins.flux.sample import DEFAULT_GUIDANCE, MAX_TEXT_TOKENS

        return dict(prompt=PROMPT, num_images_per_prompt=1, width=self.bench.size, height=self.bench.size,
                    num_inference_steps=self.bench.steps[variant], max_sequence_length=MAX_TEXT_TOKENS[variant],
                    guidance_scale=DEFAULT_GUIDANCE if variant == "dev" else 0.0, output_type="pil",
                    generator=[torch.Generator("cpu").manual_seed(7)])

    def attention(self) -> Any:
        """The attention priority ``sample`` uses on a GPU (so bare calls do the same work)."""
        import contextlib

        from fluxkiln.plugins.flux import fast

        return fast.attention_first_cudnn() if self.bench.device == "cuda" else contextlib.nullcontext()

    def bare_call(self, variant: str) -> tuple[float, Any]:
        import torch

        from fluxkiln.plugins.flux import modulation

        pipe = self.bench.pipes[variant]

        def call() -> Any:  # with the modulation table sample arms, so that only the engine's own work differs
            with torch.no_grad(), self.attention(), modulation.steps(pipe):
                return pipe(**self.call_args(variant)).images[0]

        return self.bench.timed(call)

    def reference(self, variant: str) -> None:
        """Eager bf16 reference: one transformer forward (quality guard) and stock FluxPipeline timings."""
        import torch
        from diffusers import FluxPipeline

        pipe = self.bench.pipes[variant]
        inputs = guard_inputs(pipe, self.bench.size, variant, self.bench.device)
        with torch.no_grad():
            ref = pipe.transformer(**inputs, return_dict=False)[0].float().cpu()
            again = pipe.transformer(**inputs, return_dict=False)[0].float().cpu()
        self.guards[variant] = (inputs, ref)
        blocks_in = block_inputs(pipe, inputs)
        self.block_guards[variant] = (blocks_in, block_output(pipe, blocks_in))
        self.bench.results.setdefault("eager_noise_floor", {})[variant] = {"transformer_rel_diff": rel_diff(again, ref)}
        if self.bench.args.no_stock:
            return
        stock = FluxPipeline(**pipe.components)
        stock.set_progress_bar_config(disable=True)
        self.bench.reset_peak()

        def call() -> Any:
            with torch.no_grad():
                return stock(**self.call_args(variant)).images[0]

        runs, images = self.bench.timed_repeats(call)
        self.stock_images[variant] = images[-1]
        self.bench.results["eager_noise_floor"][variant]["image_rel_diff"] = rel_diff(images[0], images[-1])
        per = statistics.median(runs[1:])
        self.bench.results["sample"][f"{variant}-stock"] = {
            "what": "stock diffusers FluxPipeline, eager bf16, same text encoders", "steps": self.bench.steps[variant],
            **per_image(runs, self.bench.steps[variant]), "warmup_s": round(runs[0], 3),
            "peak_gib": self.bench.peak_gib(),
            "stages_s": stage_times(stock, lambda: stock(**self.call_args(variant)), self.bench.sync)}
        if self.bench.device == "cuda":
            self.bench.results["sample"][f"{variant}-stock"]["gpu_step"] = kernel_breakdown(
                lambda: pipe.transformer(**inputs, return_dict=False), self.bench.work / "profile" / f"{variant}-stock")
        print(f"[bench] {variant}-stock: {per:.3f} s/image", flush=True)

    def recipe(self, variant: str, go_fast: bool, cache: float = 0.0) -> Path:
        path = self.bench.work / f"sample-{variant}-{'fast' if go_fast else 'lossless'}{'-cache' if cache else ''}.toml"
        guidance = "" if variant == "schnell" else "guidance = 3.0\n"
        if cache:
            guidance += f"cache_threshold = {cache}\n"
        head = recipe_head(f"bench-{variant}", {"base": self.bench.refs[variant]}) + sample_head("images", "base")
        path.write_text(head + f'''aspect_ratio = "custom"
width = {self.bench.size}
height = {self.bench.size}
num_inference_steps = {self.bench.steps[variant]}
{guidance}seed = 7
go_fast = {str(go_fast).lower()}
''')
        return path

    def engine_run(self, recipe: Path) -> tuple[float, float, Any, dict[str, Any]]:
        """One ``fluxkiln run`` of the recipe: (wall seconds, sample node seconds, first image, its timing)."""
        wall, result = self.bench.run_recipe(recipe, "images")
        node_s = next(e.data["seconds"] for e in result.events if e.event == "node_finished" and e.node == "images")
        first = result.outputs["images"]["output"][0]
        return wall, node_s, first.image, first.meta.get("timing", {})

    def fluxkiln_sample(self, name: str) -> None:
        variant, mode, *extra = name.split("-")
        cache = self.bench.cache_threshold if "cache" in extra else 0.0
        if "graphs" in extra:
            self.with_compile_mode(variant, GRAPHS_MODE, lambda: self.measure(name, variant, mode, cache))
        elif "nograph" in extra:
            self.without_step_graphs(lambda: self.measure(name, variant, mode, cache))
        else:
            self.measure(name, variant, mode, cache)

    def with_compile_mode(self, variant: str, mode: str, fn: Any) -> None:
        """Run ``fn`` with the blocks compiled afresh in Inductor ``mode``; back to the default mode afterwards."""
        import os

        self.reset(variant)
        os.environ["FLUXKILN_COMPILE_MODE"] = mode
        try:
            fn()
        finally:
            os.environ.pop("FLUXKILN_COMPILE_MODE", None)
            self.reset(variant)

    @staticmethod
    def without_step_graphs(fn: Any) -> None:
        """Run ``fn`` with whole-step CUDA graphs off (``FLUXKILN_CUDA_GRAPHS=0``, read at every call)."""
        import os
        from unittest import mock

        with mock.patch.dict(os.environ, {"FLUXKILN_CUDA_GRAPHS": "0"}):
            fn()

    def measure(self, name: str, variant: str, mode: str, cache: float) -> None:
        import torch

        from fluxkiln.plugins.flux.pipestate import state_of

        pipe = self.bench.pipes[variant]
        recipe = self.recipe(variant, mode == "go_fast", cache)
        self.bench.reset_peak()
        runs = [self.engine_run(recipe)]
        with engine_phases() as spent:
            runs += [self.engine_run(recipe) for _ in range(self.bench.repeats)]
        peak = self.bench.peak_gib()
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
               "steps": self.bench.steps[variant], **per_image(walls, self.bench.steps[variant]),
               "first_run_s": round(walls[0], 2), "compile_warmup_s": round(walls[0] - per, 2), "peak_gib": peak,
               "fast_paths": {"compiled_blocks": st.compiled, "fused_qkv": st.qkv_fused, "fp8": st.fp8,
                              "fp8_attention": st.fp8_attention, "compiled_vae": st.vae_compiled,
                              "modulation_table": st.modulation},
               "transformer_rel_diff": rel_diff(got, ref), "block_rel_diff": rel_diff(got_block, block_ref),
               "engine": {"run_s": round(per, 3), "node_s": round(node_per, 3), "bare_pipeline_s": round(bare, 3),
                          "overhead_run_pct": round(100 * (per / bare - 1), 2),
                          "overhead_node_pct": round(100 * (node_per / bare - 1), 2), **cache_store_seconds(runs[-1][2])}}
        row["engine"]["phases_ms"] = per_run_ms(spent, self.bench.repeats, sum(walls[1:]))
        row["stages_s"] = stage_times(pipe, lambda: self.bare_call(variant), self.bench.sync)
        if self.bench.device == "cuda":
            row["gpu_step"] = self.step_profile(pipe, inputs, name)
        stock = self.bench.results["sample"].get(f"{variant}-stock")
        if stock:
            row["ratio_to_stock"] = round(per / stock["s_per_image"], 3)
            row["image_rel_diff"] = rel_diff(runs[-1][2], self.stock_images[variant])
        if cache:
            timing = runs[-1][3]
            row.update(cache_threshold=cache, cache_skipped_steps=timing.get("cache_skipped_steps"),
                       cache_computed_steps=timing.get("cache_computed_steps"))
        self.bench.results["sample"][name] = row
        print(f"[bench] {name}: {per:.3f} s/image (first {walls[0]:.1f} s), diff {row['transformer_rel_diff']}",
              flush=True)

    def step_profile(self, pipe: Any, inputs: dict[str, Any], name: str) -> dict[str, Any]:
        """GPU kernel time by kind in one transformer forward (what limits a denoising step)."""
        import torch

        def forward() -> None:
            with torch.no_grad(), self.attention():
                pipe.transformer(**inputs, return_dict=False)

        return kernel_breakdown(forward, self.bench.work / "profile" / name)

    def reset(self, variant: str) -> None:
        """Back to eager bf16 (the two full-size pipelines share their blocks)."""
        from fluxkiln.plugins.flux.pipestate import prepare

        prepare(self.bench.pipes[variant], [], False, self.bench.device, lambda _a: {})

    def run(self) -> None:
        """The wanted configurations in the order given (so a run cut short has the first ones), each variant's
        eager reference taken before its first configuration; back to eager before switching variants (the
        two full-size pipelines share their blocks)."""
        wanted = [c for c in CONFIGS if c in configs(self.bench.args)]
        wanted.sort(key=configs(self.bench.args).index)
        if self.bench.device == "cuda":
            self.bench.results["kernels"] = self.bench.guarded("kernel-probe", kernel_probe, self.bench.device)
        current = None
        for name in wanted:
            variant = name.split("-")[0]
            if variant != current:
                if current is not None:
                    self.bench.guarded(f"{current}-reset", self.reset, current)
                current = variant
                if variant not in self.guards:
                    self.bench.guarded(f"{variant}-reference", self.reference, variant)
            if variant in self.guards:
                self.bench.guarded(name, self.fluxkiln_sample, name)
        if current is not None:
            self.bench.guarded(f"{current}-reset", self.reset, current)


def configs(args: Any, field: str = "configs") -> list[str]:
    """The comma-separated configuration names of ``--configs`` (or ``--train-configs``)."""
    return [c.strip() for c in getattr(args, field).split(",") if c.strip()]


def cache_store_seconds(image: Any) -> dict[str, float]:
    """How long the engine's disk cache takes to store one output image (the images port type's save)."""
    import tempfile
    import time
    from pathlib import Path

    from fluxkiln.engine.ports import BUILTIN_PORT_TYPES, ImageItem, Images

    images = next(p for p in BUILTIN_PORT_TYPES if p.name == "images")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        images.save(Images([ImageItem(image=image)]), Path(tmp))
        return {"cache_store_s": round(time.perf_counter() - t0, 4)}
