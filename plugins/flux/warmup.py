"""``fluxkiln warmup RECIPE``: compile ahead of time what a recipe's sampling needs, so its first real image in a
later process does not pay for compilation.

The recipe runs once with every ``sample`` node at one denoising step (compiled code depends on the image size,
the batch and the model, not on the step count), every node forced, into a throwaway run folder; Inductor's
graph and kernel caches under ``<cache>/inductor`` keep what was compiled for every later process, and each
transformer block and VAE decoder variant the run compiles is saved precompiled (:mod:`.precompiled`, as in any
run; warmup also compiles the VAE decoder, which a short run decodes eagerly), so that a later process loads it
without tracing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

HELP = "compile ahead of time the image sizes a recipe samples (one step each), for a fast first image later"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("warmup", help=HELP, description=HELP)
    p.add_argument("recipe", type=Path, help="the recipe (TOML) to warm up")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, as for `fluxkiln run`")
    p.set_defaults(main=main)


def step_overrides(checked) -> list[str]:
    """``nodes.<id>.num_inference_steps=1`` for every sample node of a checked recipe."""
    return [f"nodes.{nid}.num_inference_steps=1" for nid, spec in checked.recipe.nodes.items()
            if spec.type == "sample"]


def main(args: argparse.Namespace) -> int:
    import time

    from fluxkiln.engine.errors import RecipeInvalid
    from fluxkiln.engine.runner import Engine

    from . import precompiled

    engine = Engine()
    try:
        checked = engine.check(args.recipe, args.overrides)
        overrides = args.overrides + step_overrides(checked)
        if len(overrides) == len(args.overrides):
            print(f"fluxkiln warmup: {args.recipe} has no sample node: nothing to compile")
            return 0
        out = Path(tempfile.mkdtemp(prefix="fluxkiln-warmup-"))
        t0 = time.perf_counter()
        try:
            with precompiled.Recording() as rec:
                result = engine.run(args.recipe, overrides=overrides, force_all=True, output=out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    except RecipeInvalid as exc:
        import sys

        print("\n".join(p.format() for p in exc.problems), file=sys.stderr)
        return 2
    if result.status != "ok":
        failed = [f"{e.node}: {e.data.get('error')}" for e in result.events if e.event == "node_failed"]
        print("fluxkiln warmup failed: " + "; ".join(failed))
        return 1
    n = len(overrides) - len(args.overrides)
    print(f"fluxkiln warmup: {n} sample node(s) compiled in {time.perf_counter() - t0:.1f} s; a new process now "
          "loads them from the compile cache")
    why = precompiled.unavailable()
    if why is not None:
        print(f"fluxkiln warmup: nothing saved precompiled ({why}); a new process traces each block again, then "
              "finds its code in the compile cache")
    elif rec.saved or rec.failed:
        print(f"fluxkiln warmup: {len(rec.saved)} transformer block and VAE decoder variant(s) newly saved "
              f"precompiled in {rec.seconds:.1f} s" + (f", {len(rec.failed)} could not be (see above)" if rec.failed
                                                      else "") + "; a new process loads them without tracing")
    return 0
