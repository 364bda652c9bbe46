"""One ``fluxkiln bench`` session: the pipelines under test, the Engine that runs the recipes, the results (written
as they come), and the timing and memory helpers every part of the bench shares."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPT = "a lighthouse on a cliff at dusk, volumetric light, 35mm photo"


class BenchSession:
    """Built once per ``fluxkiln bench``; the sampling and training parts read and record through it."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.tiny = args.tiny
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.size = 256 if self.tiny else 1024
        self.steps = {"dev": 4, "schnell": 2} if self.tiny else {"dev": 28, "schnell": 4}
        self.repeats = args.repeats or (1 if self.tiny else 2)
        self.cache_threshold = getattr(args, "cache_threshold", 0.1)
        self.train_steps = args.train_steps or (4 if self.tiny else 8)
        self.train_res = args.train_resolution or (64 if self.tiny else 1024)
        self.out = args.out or Path("bench.json")
        self.work = Path(tempfile.mkdtemp(prefix="fluxkiln-bench-"))
        self.results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "mode": "tiny" if self.tiny else
                                        "random-weights", "device": self.device, "sample": {}, "train": {},
                                        "errors": []}
        self.pipes: dict[str, Any] = {}
        self.refs: dict[str, str] = {}

    def setup(self, build: bool = True) -> None:
        """Build the pipelines and hand them to a fresh Engine's residency under the keys ``load_model`` computes
        (``build=False``: only the versions and the device, for parts that bring their own models)."""
        import torch
        from diffusers import __version__ as dv

        from fluxkiln.engine.runner import Engine
        from fluxkiln.plugins.flux.load import Source, model_key, pipeline_bytes

        from .models import write_config_folder

        info = self.results
        info.update(torch=torch.__version__, diffusers=dv,
                    gpu=torch.cuda.get_device_name() if self.device == "cuda" else "cpu")
        if not build:
            return
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
            from .models import build_full_size

            return build_full_size(self.device)
        from fluxkiln.plugins.flux.tiny import build_tiny_flux

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

    # ------------------------------------------------------------------ timing and memory
    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self, counter: str = "allocated") -> float | None:
        """The GPU's peak ``allocated`` (tensors) or ``reserved`` (allocator) memory since :meth:`reset_peak`."""
        import torch

        if self.device != "cuda":
            return None
        read = torch.cuda.max_memory_reserved if counter == "reserved" else torch.cuda.max_memory_allocated
        return round(read() / 2**30, 2)

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(wall seconds, value) of one call of ``fn``, the device synchronised before and after it."""
        self.sync()
        t0 = time.perf_counter()
        value = fn()
        self.sync()
        return time.perf_counter() - t0, value

    def timed_repeats(self, fn: Callable[[], Any]) -> tuple[list[float], list[Any]]:
        """:meth:`timed` 1 + ``repeats`` times, the first call being the warm-up: (the seconds, the values)."""
        calls = [self.timed(fn) for _ in range(1 + self.repeats)]
        return [wall for wall, _ in calls], [value for _, value in calls]

    def run_recipe(self, recipe: Path, force: str) -> tuple[float, Any]:
        """One timed ``Engine.run`` of ``recipe`` (node ``force`` on run again) into the work folder's
        ``runs/<stem>``: (wall seconds, the run's result); a failed run raises with what its nodes said."""
        wall, result = self.timed(lambda: self.engine.run(recipe, force=[force], output=self.work / "runs" /
                                                          recipe.stem))
        if not result.ok:
            failed = [e.data for e in result.events if e.event == "node_failed"]
            raise RuntimeError(f"recipe {recipe.name} failed: {failed}")
        return wall, result


def per_image(walls: list[float], steps: int | None = None) -> dict[str, Any]:
    """A row's timing fields from the wall seconds of 1 + repeats runs: the median of the runs after the first (the
    warm-up) per image and, given the steps, per step, and every run."""
    per = statistics.median(walls[1:])
    row: dict[str, Any] = {"s_per_image": round(per, 3)}
    if steps:
        row["s_per_step"] = round(per / steps, 4)
    row["runs_s"] = [round(w, 3) for w in walls]
    return row


def recipe_head(name: str, models: dict[str, str]) -> str:
    """A bench recipe's start: ``[recipe]`` named ``name``, then one ``load_model`` node per (node id, model)."""
    loads = "".join(f'\n[nodes.{node}]\ntype = "load_model"\nmodel = {json.dumps(ref)}\n'
                    for node, ref in models.items())
    return f'[recipe]\nname = "{name}"\n{loads}'


def sample_head(node: str, model: str) -> str:
    """The start of a ``sample`` node on the ``model`` node with the bench's prompt (its settings follow)."""
    return f'\n[nodes.{node}]\ntype = "sample"\nmodel = "@{model}"\nprompt = {json.dumps(PROMPT)}\n'
