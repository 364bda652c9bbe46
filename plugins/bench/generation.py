"""``fluxkiln bench``'s generation part: Full HD (1920x1080) images, lossless and go_fast, beside stock
``FluxPipeline`` at the same size, and the dev + schnell hybrid (a 4-step schnell draft refined by dev
image-to-image) beside dev alone at its default steps — all through the Engine with the real ``sample`` node."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .session import PROMPT, BenchSession, per_image, recipe_head, sample_head

CONFIGS = ("fullhd-stock", "fullhd-lossless", "fullhd-go_fast", "hybrid", "hybrid-go_fast")
REFINE_STEPS, REFINE_STRENGTH = 12, 0.6  # dev runs the last 8 of 12 steps over the draft


class GenerationBench:
    """Times whole runs (every node of the recipe) so a row says what a user waits for one image."""

    def __init__(self, bench: BenchSession):
        self.bench = bench

    def run(self, wanted: list[str]) -> None:
        for name in CONFIGS:
            if name in wanted:
                self.bench.guarded(name, self.measure, name)

    def measure(self, name: str) -> None:
        b = self.bench
        if name == "fullhd-stock":
            row = self.stock_fullhd()
        else:
            hybrid = name.startswith("hybrid")
            recipe = self.hybrid_recipe(name.endswith("go_fast")) if hybrid else self.fullhd_recipe(
                name.endswith("go_fast"))
            first, node = ("draft", "refined") if hybrid else ("images", "images")
            steps = None if hybrid else b.steps["dev"]
            b.reset_peak()
            walls, image = self.timed_runs(recipe, first, node)
            row = {"what": recipe.stem, **per_image(walls, steps), "first_run_s": round(walls[0], 2),
                   "peak_gib": b.peak_gib(), "size": list(image.size)}
            dev = b.results["sample"].get("dev-lossless" if name == "hybrid" else "dev-go_fast")
            if name.startswith("hybrid") and dev:
                row["ratio_to_dev_28_steps"] = round(statistics.median(walls[1:]) / dev["s_per_image"], 3)
        stock = b.results.setdefault("generation", {}).get("fullhd-stock")
        if name.startswith("fullhd-") and name != "fullhd-stock" and stock:
            row["ratio_to_stock"] = round(row["s_per_image"] / stock["s_per_image"], 3)
        b.results.setdefault("generation", {})[name] = row
        print(f"[bench] {name}: {row['s_per_image']:.3f} s/image", flush=True)

    def timed_runs(self, recipe: Path, first: str, node: str) -> tuple[list[float], Any]:
        """Run the recipe 1 + repeats times from node ``first`` on; (wall seconds, ``node``'s first image)."""
        walls, image = [], None
        for _ in range(1 + self.bench.repeats):
            wall, result = self.bench.run_recipe(recipe, first)
            walls.append(wall)
            image = result.outputs[node]["output"][0].image
        return walls, image

    def stock_fullhd(self) -> dict[str, Any]:
        """Stock FluxPipeline at the generated size, 1920x1088 (stock diffusers has no Full HD crop)."""
        import torch
        from diffusers import FluxPipeline

        b = self.bench
        width, height = self.generated()
        stock = FluxPipeline(**b.pipes["dev"].components)
        stock.set_progress_bar_config(disable=True)
        b.reset_peak()

        def call() -> None:
            with torch.no_grad():
                stock(prompt=PROMPT, width=width, height=height, num_inference_steps=b.steps["dev"],
                      guidance_scale=3.0, generator=torch.Generator("cpu").manual_seed(7))

        runs, _ = b.timed_repeats(call)
        return {"what": f"stock diffusers FluxPipeline, eager bf16, {width}x{height}",
                **per_image(runs, b.steps["dev"]), "peak_gib": b.peak_gib()}

    def generated(self) -> tuple[int, int]:
        """The size the pipeline generates: Full HD's 1920x1088 (cropped to 1080); 480x272 on the tiny model."""
        return (1920, 1088) if not self.bench.tiny else (480, 272)

    def fullhd_recipe(self, go_fast: bool) -> Path:
        b = self.bench
        size = 'aspect_ratio = "16:9"\nmegapixels = "2"' if not b.tiny else \
            'aspect_ratio = "custom"\nwidth = 480\nheight = 272'
        path = b.work / f"fullhd-{'go_fast' if go_fast else 'lossless'}.toml"
        head = recipe_head("bench-fullhd", {"base": b.refs["dev"]}) + sample_head("images", "base")
        path.write_text(head + f'''{size}
num_inference_steps = {b.steps["dev"]}
guidance = 3.0
seed = 7
go_fast = {str(go_fast).lower()}
''')
        return path

    def hybrid_recipe(self, go_fast: bool) -> Path:
        b = self.bench
        fast = str(go_fast).lower()
        path = b.work / f"hybrid{'-go_fast' if go_fast else ''}.toml"
        head = recipe_head("bench-hybrid", {"schnell": b.refs["schnell"], "dev": b.refs["dev"]})
        path.write_text(head + sample_head("draft", "schnell") + f'''aspect_ratio = "custom"
width = {b.size}
height = {b.size}
num_inference_steps = {b.steps["schnell"]}
seed = 7
go_fast = {fast}

[nodes.refined]
type = "sample"
model = "@dev"
image = "@draft"
num_inference_steps = {REFINE_STEPS if not b.tiny else 4}
prompt_strength = {REFINE_STRENGTH}
megapixels = "{'1' if not b.tiny else '0.25'}"
guidance = 3.0
seed = 7
go_fast = {fast}
''')
        return path
