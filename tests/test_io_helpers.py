"""Shared helpers for the io plugin tests: a real RunContext on a parsed recipe, and test images."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fluxkiln.engine import ImageItem, Images, RunContext
from fluxkiln.engine.recipe import parse_recipe

RECIPE = """\
[recipe]
name = "io-test"

[nodes.base]
type = "load_model"
model = "builtin:tiny-flux"

[nodes.images]
type = "sample"
model = "@base"
prompt = "a red fox in snow"
num_outputs = 4
seed = 42

[nodes.saved]
type = "save"
images = "@images"
"""


def make_ctx(tmp_path: Path, node: str = "saved", text: str = RECIPE, overrides: list[str] | None = None,
             recipe_file: str = "io-test.toml") -> tuple[RunContext, list[Any]]:
    """A real RunContext whose events are collected in the returned list."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / recipe_file
    path.write_text(text)
    recipe, problems = parse_recipe(text, path, overrides)
    assert not problems, problems
    events: list[Any] = []
    ctx = RunContext(run_id="r1", node=node, type="save", run_dir=tmp_path / "runs" / recipe.name,
                     state_root=tmp_path / "state", emit=events.append, cancel=threading.Event(), models=None,
                     resolver=lambda ref: None, recipe=recipe)
    return ctx, events


def picture(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48), noise: bool = False) -> Any:
    """A small RGB test image; ``noise`` adds deterministic texture so lossy quality matters."""
    from PIL import Image

    im = Image.new("RGB", size, colour)
    if noise:
        px = im.load()
        for y in range(size[1]):
            for x in range(size[0]):
                v = (x * 7919 + y * 104729 + x * y * 31) % 256
                px[x, y] = (v, (v * 3) % 256, (v * 7) % 256)
    return im


def sample_images(n: int = 4, seed: int = 42, **meta: Any) -> Images:
    """Images as the sample node produces them: image i has seed+i and the node's parameters in meta."""
    params = {"prompt": "a red fox in snow", "num_outputs": n, "seed": seed, "num_inference_steps": 4,
              "guidance": 3.0, "aspect_ratio": "1:1"}
    out = Images()
    for i in range(n):
        m = {"node": "images", "node_type": "sample", "params": dict(params), "model": "builtin:tiny-flux",
             "index": i, **meta}
        out.append(ImageItem(image=picture((40 * i, 100, 200 - 40 * i)), seed=seed + i,
                             prompt="a red fox in snow", meta=m))
    return out
