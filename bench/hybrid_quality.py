"""The dev + schnell hybrid's quality on mini-flux: the shipped ``recipes/hybrid.toml`` run on the mini-flux
models over held-out prompts, each of its three outputs (schnell draft, hybrid, dev alone) scored by the
``evaluate`` node's pixel checker, with the CPU time each path takes here.

    nice -n 10 python bench/hybrid_quality.py [--prompts 32] [--threads 1] [--out bench/hybrid_quality.json]

It prints a short table and writes the JSON that ``python bench/perf_docs.py`` turns into the "is the
hybrid worth it" part of docs/generation.md: per path the mean of every checker score, the per-image
scores, CPU seconds per image (process time of the sample nodes; the hybrid is draft + refinement) beside
the H100 seconds per image of the newest committed ``bench/*-generation.json``, and paired differences
between the paths (same prompt and seed) with a 95 % interval.  The recipe runs as users run it on
mini-flux, at ``megapixels = "0.25"`` (512×512; image-to-image keeps that size).  One torch thread is
the default: on a small shared CPU, OpenMP threads that wait for each other make mini-flux many times
slower, not faster.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from fluxkiln.engine import hookimpl

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "hybrid.toml"
SAMPLES = ("draft", "refined", "dev_only")  # the recipe's sample nodes
PATHS = {"draft": ("schnell 4 steps (the draft)", ("draft",)),
         "hybrid": ("hybrid: draft + dev refinement", ("draft", "refined")),
         "dev": ("dev 28 steps", ("dev_only",))}
SCORED = {"draft": "draft", "hybrid": "refined", "dev": "dev_only"}  # the node whose images each path scores
COMPARE = (("hybrid", "dev"), ("dev", "draft"), ("hybrid", "draft"))
KEYS = ("score", "colour", "shape", "size", "position", "background", "count", "all")


class CpuClock:
    """CPU (process) and wall seconds of each node of a run, from its started/finished events."""

    def __init__(self) -> None:
        self.started: dict[str, tuple[float, float]] = {}
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    @hookimpl
    def on_event(self, event: Any) -> None:
        if event.event == "node_started":
            self.started[event.node] = (time.process_time(), time.perf_counter())
        elif event.event == "node_finished" and event.node in self.started:
            cpu, wall = self.started.pop(event.node)
            self.cpu[event.node] = time.process_time() - cpu
            self.wall[event.node] = time.perf_counter() - wall


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of a - b over paired images and its 95 % interval (normal approximation)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"mean": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "n": n}


def h100_seconds(bench: Path) -> tuple[str | None, dict[str, float | None]]:
    """H100 seconds per image of dev alone and the hybrid (lossless, 1024²) from the newest generation bench."""
    found = [(json.loads(p.read_text()), p) for p in bench.glob("*-generation.json")]
    if not found:
        return None, {path: None for path in PATHS}
    data, path = max(found, key=lambda dp: (dp[0].get("date", ""), dp[1].name))
    pick = {"draft": None, "hybrid": data.get("generation", {}).get("hybrid"),
            "dev": data.get("sample", {}).get("dev-lossless")}
    return f"bench/{path.name}", {k: (v or {}).get("s_per_image") for k, v in pick.items()}


def overrides(prompts: list[str], seed: int) -> list[str]:
    return ["vars.dev_model=builtin:mini-flux", "vars.schnell_model=builtin:mini-flux-schnell",
            'vars.megapixels="0.25"', f"vars.prompts={json.dumps(prompts)}", f"vars.seed={seed}"]


def measure(prompts: list[str], seed: int, extra: tuple[str, ...] = ()) -> tuple[dict[str, Any], str, float]:
    """Run the recipe with an evaluate node per output (``extra``: more ``--set`` overrides); per path its
    scores and seconds per image, the image size and the wall seconds of the run."""
    from fluxkiln.engine.runner import Engine

    clock = CpuClock()
    with tempfile.TemporaryDirectory(prefix="fluxkiln-hybrid-") as tmp:
        recipe = Path(tmp) / "hybrid.toml"
        recipe.write_text(RECIPE.read_text() + "".join(
            f'\n[nodes.score_{n}]\ntype = "evaluate"\nimages = "@{n}"\nmetric = "mini"\n' for n in SAMPLES))
        t0 = time.perf_counter()
        engine = Engine(cache_dir=Path(tmp) / "cache")
        result = engine.run(recipe, output=Path(tmp) / "run", overrides=[*overrides(prompts, seed), *extra],
                            observers=[clock])
        if not result.ok:
            raise SystemExit(f"the hybrid recipe failed: {[e.data for e in result.events if e.event == 'node_failed']}")
        images = {n: json.loads((result.run_dir / f"score_{n}" / "scores.json").read_text()) for n in SAMPLES}
        sizes = {tuple(i.image.size) for n in SAMPLES for i in result.outputs[n]["output"]}
    if len(sizes) != 1:
        raise SystemExit(f"the three paths made images of different sizes: {sorted(sizes)}")
    [(width, height)] = sizes
    paths = {}
    for path, (label, nodes) in PATHS.items():
        data = images[SCORED[path]]
        paths[path] = {"label": label, "mean": {k: data["mean"][k] for k in KEYS if k in data["mean"]},
                       "scores": [row["scores"]["score"] for row in data["images"]],
                       "cpu_s_per_image": round(sum(clock.cpu[n] for n in nodes) / len(prompts), 3),
                       "wall_s_per_image": round(sum(clock.wall[n] for n in nodes) / len(prompts), 3)}
    return paths, f"{width}x{height}", time.perf_counter() - t0


def report(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fluxkiln.plugins.miniflux.adherence import eval_prompts

    torch.set_num_threads(args.threads)
    prompts = eval_prompts(args.prompts)
    paths, size, seconds = measure(prompts, args.seed)
    source, h100 = h100_seconds(HERE)
    for path, row in paths.items():
        row["h100_s_per_image"] = h100[path]
    recipe_vars = tomllib.loads(RECIPE.read_text())["vars"]
    return {"date": time.strftime("%Y-%m-%d"), "model": "builtin:mini-flux, builtin:mini-flux-schnell",
            "prompts": len(prompts), "size": size, "seed": args.seed,
            "refine": {"steps": recipe_vars["refine_steps"], "strength": recipe_vars["refine_strength"]},
            "cpu": f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}",
            "h100_source": source, "h100_what": "1024x1024, lossless (go_fast = false)",
            "seconds": round(seconds, 1), "paths": paths,
            "compare": {f"{a} - {b}": paired(paths[a]["scores"], paths[b]["scores"]) for a, b in COMPARE}}


def table(data: dict[str, Any]) -> str:
    """The short table the script prints."""
    keys = [k for k in KEYS if any(k in row["mean"] for row in data["paths"].values())]
    lines = [f"{'path':<32}" + "".join(f"{k[:6]:>8}" for k in keys) + f"{'CPU s':>8}{'H100 s':>8}"]
    for row in data["paths"].values():
        h100 = row["h100_s_per_image"]
        lines.append(f"{row['label']:<32}" + "".join(f"{row['mean'].get(k, float('nan')):>8.3f}" for k in keys)
                     + f"{row['cpu_s_per_image']:>8.2f}" + (f"{h100:>8.2f}" if h100 is not None else f"{'-':>8}"))
    for name, c in data["compare"].items():
        lines.append(f"score {name}: {c['mean']:+.3f} (95 % interval {c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts (at least 2)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=HERE / "hybrid_quality.json")
    args = p.parse_args(argv)
    if args.prompts < 2:
        p.error("--prompts must be at least 2 (the intervals need two images per path)")
    data = report(args)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
    print(f"wrote {args.out} ({data['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
