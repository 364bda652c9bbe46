"""Prompt adherence of mini-flux on held-out prompts, scored by the pixel checker.

    python -m fluxkiln.plugins.miniflux.adherence [--prompts 200] [--variants dev,schnell,guidance]
                                                  [--json FILE] [--model-dir DIR] [--shapes cross,diamond]

Runs on any device (CPU by default).  The prompts are drawn from a fixed seed among the canonical prompts
the training sampler never produces (see :func:`~.world.held_out`).  ``guidance`` compares dev at
guidance 1, the default 3 and 5.  ``--shapes`` names other shapes in the prompts: whether a base trained with
``more_shapes`` draws the shapes it was taught.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checker import Check, check
from .world import DRAWABLE, SHAPES, random_scene

EVAL_SEED = 7
SUMMARY_KEYS = ("colour", "shape", "size", "position", "background", "count", "all")


def eval_prompts(n: int, seed: int = EVAL_SEED, shapes: tuple[str, ...] = SHAPES) -> list[str]:
    """``n`` held-out prompts (never in training), the same every time; ``shapes``: the shapes they may name (a
    base's taught shapes, say)."""
    rng = random.Random(seed)
    return [random_scene(rng, split="eval", shapes=shapes).prompt for _ in range(n)]


def generate(pipe: Any, prompts: list[str], *, steps: int, guidance: float | None, width: int = 256,
             height: int = 256, seed: int = 0, batch: int = 8, true_cfg: float = 1.0) -> list[Any]:
    """Images for ``prompts`` (prompt i from seed + i) through the FluxPipeline's own call; ``true_cfg`` > 1
    adds classifier-free guidance against the empty prompt (two passes a step)."""
    import torch

    from fluxkiln.plugins.flux import modulation

    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        cfg = dict(true_cfg_scale=true_cfg, negative_prompt=[""] * len(chunk)) if true_cfg > 1 else {}
        with torch.no_grad(), modulation.steps(pipe):
            out += pipe(prompt=chunk, width=width, height=height, num_inference_steps=steps,
                        guidance_scale=0.0 if guidance is None else guidance, generator=gens,
                        max_sequence_length=pipe.tokenizer_2.model_max_length, **cfg).images
    return out


def summarise(checks: list[Check]) -> dict[str, float]:
    """Mean of each attribute's score over the images where the prompt says it (percent)."""
    result = {}
    for key in SUMMARY_KEYS:
        vals = [c.scores[key] for c in checks if c.scores.get(key) is not None]
        result[key] = round(100 * sum(vals) / len(vals), 1) if vals else float("nan")
    return result


def checks_of(images: list[Any], prompts: list[str]) -> list[Check]:
    """The checker's reading of each image against its prompt."""
    return [check(im, p) for im, p in zip(images, prompts, strict=True)]


def score_images(images: list[Any], prompts: list[str]) -> dict[str, float]:
    return summarise(checks_of(images, prompts))


RUNS: dict[str, list[tuple[str, str, int, float | None]]] = {
    # name: [(label, variant, steps, guidance)]
    "dev": [("dev 28 steps, guidance 3", "dev", 28, 3.0)],
    "schnell": [("schnell 4 steps", "schnell", 4, None)],
    "guidance": [("dev 28 steps, guidance 1", "dev", 28, 1.0), ("dev 28 steps, guidance 5", "dev", 28, 5.0)],
}


def run(load: Callable[[str], Any], n: int, variants: list[str], log: Callable[[str], None] = print,
        batch: int = 8, size: int = 256, shapes: tuple[str, ...] = SHAPES) -> dict[str, dict[str, float]]:
    """Adherence rows for the requested ``variants`` (keys of :data:`RUNS`) on prompts naming ``shapes``;
    ``load(variant)`` gives a pipeline."""
    prompts = eval_prompts(n, shapes=shapes)
    rows: dict[str, dict[str, float]] = {}
    pipes: dict[str, Any] = {}
    for name in variants:
        for label, variant, steps, guidance in RUNS[name]:
            pipe = pipes.get(variant) or pipes.setdefault(variant, load(variant))
            t0 = time.perf_counter()
            images = generate(pipe, prompts, steps=steps, guidance=guidance, batch=batch, width=size, height=size)
            rows[label] = score_images(images, prompts) | {"seconds": round(time.perf_counter() - t0, 1)}
            log(f"{label}: {rows[label]}")
    return rows


def table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table of adherence rows."""
    head = "| run | " + " | ".join(SUMMARY_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(SUMMARY_KEYS) + 1)]
    lines += [f"| {label} | " + " | ".join(f"{row[k]:.1f}" for k in SUMMARY_KEYS) + " |" for label, row in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxkiln.plugins.miniflux.adherence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--variants", default="dev,schnell,guidance")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    parser.add_argument("--model-dir", type=Path, help="folder holding mini-flux/ and mini-flux-schnell/ "
                        "(default: the shipped weights)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="the shapes the prompts name, comma-separated "
                        "(default: mini-flux's four; a base trained with more_shapes: its taught ones, e.g. cross,diamond)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in RUNS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
    if not shapes or any(s not in DRAWABLE for s in shapes):
        parser.error(f"--shapes {args.shapes!r}: name one or more of {', '.join(DRAWABLE)}")
    from .weights import load_pipeline

    rows = run(lambda v: load_pipeline(v, args.model_dir), args.prompts, variants, shapes=shapes)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
