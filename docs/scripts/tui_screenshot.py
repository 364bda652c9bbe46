"""Retake the terminal UI screenshot of the documentation from a real run.

    nice -n 10 .venv/bin/python docs/scripts/tui_screenshot.py   # docs/tui-screenshot.svg and .png

It copies ``recipes/train-lora-tiny.toml`` and its data to a temporary folder (a run writes
``runs/`` there, and the cache is a fresh one, so every node really runs), opens the copy in
fluxkiln's own Textual app (``App.run_test`` at 140x44: the same compositor and SVG export as in a
terminal), starts the run with ctrl+r, waits until the LoRA training has shown a sample in the
Images tab and the loss curve has points, shows the Images tab (f5) and saves the app's own SVG;
librsvg's ``rsvg-convert`` renders the PNG 1680 px wide.  The run is then cancelled and the
temporary folder removed.

``--set nodes.lora.steps=120``-style overrides change a value of the copied recipe (the editor in
the screenshot shows the changed value); ``--sample-step N`` waits for the training sample of step
N (default: the first one, ``sample_every``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "train-lora-tiny.toml"
SIZE = (140, 44)  # terminal columns x rows
PNG_WIDTH = 1680
TIMEOUT = 30 * 60  # seconds the run may take to show its sample


def set_value(text: str, override: str) -> str:
    """``nodes.NODE.KEY=VALUE`` (VALUE in TOML) replaces KEY's line in ``[nodes.NODE]`` of ``text``."""
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 3 or parts[0] != "nodes":
        raise SystemExit(f"--set {override!r}: write nodes.NODE.KEY=VALUE, e.g. nodes.lora.steps=120")
    table = re.search(rf"^\[nodes\.{re.escape(parts[1])}\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if table is None:
        raise SystemExit(f"--set {override!r}: the recipe has no [nodes.{parts[1]}] table")
    body, n = re.subn(rf"^({re.escape(parts[2])}\s*=\s*)[^#\n]*?(\s*(#.*)?)$", rf"\g<1>{value.strip()}\g<2>",
                      table.group(1), count=1, flags=re.M)
    if n == 0:
        raise SystemExit(f"--set {override!r}: [nodes.{parts[1]}] has no line for {parts[2]!r}")
    return text[: table.start(1)] + body + text[table.end(1):]


def copy_recipe(work: Path, overrides: list[str]) -> Path:
    """The recipe and the data it reads, under ``work/recipes/``; returns the recipe's path relative to ``work``."""
    recipes = work / "recipes"
    recipes.mkdir()
    shutil.copytree(RECIPE.parent / "data", recipes / "data")
    text = RECIPE.read_text(encoding="utf-8")
    for override in overrides:
        text = set_value(text, override)
    (recipes / RECIPE.name).write_text(text, encoding="utf-8")
    return Path("recipes") / RECIPE.name


def training_sample_step(app, node: str) -> int | None:
    """The step of the live training sample of ``node`` the Images tab holds, if any."""
    from fluxkiln.tui.images import ImagePreview

    for thumb in app.main.query_one(ImagePreview).thumbs:
        found = re.search(r"· step (\d+) ·", thumb.caption)
        if thumb.live and thumb.node == node and found and "sample" in thumb.caption:
            return int(found.group(1))
    return None


async def until(pilot, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.5)


async def take(recipe: Path, cache: Path, svg: Path, node: str, sample_step: int | None) -> None:
    """Run ``recipe`` in the app and save its SVG once ``node`` has shown a training sample."""
    from fluxkiln.engine.registry import Registry
    from fluxkiln.engine.runner import Engine
    from fluxkiln.tui.app import FluxkilnApp
    from fluxkiln.tui.plot import MetricPlot

    app = FluxkilnApp(recipe, engine=Engine(Registry.load(), cache_dir=cache))
    async with app.run_test(size=SIZE) as pilot:
        main = app.main
        await until(pilot, lambda: main.status.status.problems == 0, 120, "the recipe to validate")
        await pilot.press("ctrl+r")
        print("run started; waiting for a training sample ...", file=sys.stderr)

        def ready() -> bool:
            if not main.running:
                raise SystemExit("the run ended before it showed a training sample: see the app's log")
            step = training_sample_step(app, node)
            plotted = main.query_one(MetricPlot).series.get(node, {}).get("loss")
            return step is not None and (sample_step is None or step >= sample_step) and bool(plotted)

        await until(pilot, ready, TIMEOUT, f"a training sample of {node!r}")
        await pilot.press("f5")  # the Images tab, as a user would open it
        await pilot.pause(0.5)
        app.save_screenshot(filename=svg.name, path=str(svg.parent))
        print(f"saved {svg} at training step {training_sample_step(app, node)}", file=sys.stderr)
        await pilot.press("escape")  # cancel the run at its next safe point
        await until(pilot, lambda: not main.running, 600, "the run to stop")


def to_png(svg: Path, png: Path, width: int = PNG_WIDTH) -> None:
    """Render ``svg`` to ``png``, ``width`` pixels wide, with librsvg's ``rsvg-convert``."""
    if not shutil.which("rsvg-convert"):
        raise SystemExit("rsvg-convert is missing: install librsvg (apt-get install librsvg2-bin)")
    subprocess.run(["rsvg-convert", "--width", str(width), "--keep-aspect-ratio", "-o", str(png), str(svg)],
                   check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="nodes.NODE.KEY=VALUE",
                        help="change a value of the copied recipe (repeatable)")
    parser.add_argument("--node", default="lora", help="the training node whose sample to wait for (lora)")
    parser.add_argument("--sample-step", type=int, help="wait for the sample of this step or later")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tui-screenshot.svg",
                        help="the SVG to write; the PNG goes beside it (docs/tui-screenshot.svg)")
    args = parser.parse_args(argv)
    svg = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="fluxkiln-screenshot-") as tmp:
        work = Path(tmp)
        recipe = copy_recipe(work, args.overrides)
        here = Path.cwd()
        os.chdir(work)  # the status bar shows recipes/train-lora-tiny.toml; runs/ is written here
        try:
            asyncio.run(take(recipe, work / "cache", svg, args.node, args.sample_step))
        finally:
            os.chdir(here)
    to_png(svg, svg.with_suffix(".png"))
    print(f"wrote {svg} and {svg.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
