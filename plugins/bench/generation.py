"""``fluxkiln bench``'s generation part: Full HD (1920x1080) images, lossless and go_fast, beside stock
``FluxPipeline`` at the same size, and the dev + schnell hybrid (a 4-step schnell draft refined by dev
image-to-image) beside dev alone at its default steps — all through the Engine with the real ``sample`` node."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from .session import PROMPT, BenchSession

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
            per = statistics.median(walls[1:])
            row = {"what": recipe.stem, "s_per_image": round(per, 3), "runs_s": [round(w, 3) for w in walls],
                   "first_run_s": round(walls[0], 2), "peak_gib": b.peak_gib(), "size": list(image.size)}
            if steps:
                row["s_per_step"] = round(per / steps, 4)
            dev = b.results["sample"].get("dev-lossless" if name == "hybrid" else "dev-go_fast")
            if name.startswith("hybrid") and dev:
                row["ratio_to_dev_28_steps"] = round(per / dev["s_per_image"], 3)
        stock = b.results.setdefault("generation", {}).get("fullhd-stock")
        if name.startswith("fullhd-") and name != "fullhd-stock" and stock:
            row["ratio_to_stock"] = round(row["s_per_image"] / stock["s_per_image"], 3)
        b.results.setdefault("generation", {})[name] = row
        print(f"[bench] {name}: {row['s_per_image']:.3f} s/image", flush=True)

    def timed_runs(self, recipe: Path, first: str, node: str) -> tuple[list[float], Any]:
        """Run the recipe 1 + repeats times from node ``first`` on; (wall seconds, ``node``'s first image)."""
        b, walls, image = self.bench, [], None
        for _ in range(1 + b.repeats):
            b.sync()
            t0 = time.perf_counter()
            result = b.engine.run(recipe, force=[first], output=b.work / "runs" / recipe.stem)
            b.sync()
            walls.append(time.perf_counter() - t0)
            if not result.ok:
                failed = [e.data for e in result.events if e.event == "node_failed"]
                raise RuntimeError(f"recipe {recipe.name} failed: {failed}")
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
        runs = []
        for _ in range(1 + b.repeats):
            b.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                stock(prompt=PROMPT, width=width, height=height, num_inference_steps=b.steps["dev"],
                      guidance_scale=3.0, generator=torch.Generator("cpu").manual_seed(7))
            b.sync()
            runs.append(time.perf_counter() - t0)
        per = statistics.median(runs[1:])
        return {"what": f"stock diffusers FluxPipeline, eager bf16, {width}x{height}", "s_per_image": round(per, 3),
                "s_per_step": round(per / b.steps["dev"], 4), "runs_s": [round(r, 3) for r in runs],
                "peak_gib": b.peak_gib()}

    def generated(self) -> tuple[int, int]:
        """The size the pipeline generates: Full HD's 1920x1088 (cropped to 1080); 480x272 on the tiny model."""
        return (1920, 1088) if not self.bench.tiny else (480, 272)

    def fullhd_recipe(self, go_fast: bool) -> Path:
        b = self.bench
        size = 'aspect_ratio = "16:9"\nmegapixels = "2"' if not b.tiny else \
            'aspect_ratio = "custom"\nwidth = 480\nheight = 272'
        path = b.work / f"fullhd-{'go_fast' if go_fast else 'lossless'}.toml"
        path.write_text(f'''[recipe]
name = "bench-fullhd"

[nodes.base]
type = "load_model"
model = {json.dumps(b.refs["dev"])}

[nodes.images]
type = "sample"
model = "@base"
prompt = {json.dumps(PROMPT)}
{size}
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
        path.write_text(f'''[recipe]
name = "bench-hybrid"

[nodes.schnell]
type = "load_model"
model = {json.dumps(b.refs["schnell"])}

[nodes.dev]
type = "load_model"
model = {json.dumps(b.refs["dev"])}

[nodes.draft]
type = "sample"
model = "@schnell"
prompt = {json.dumps(PROMPT)}
aspect_ratio = "custom"
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
