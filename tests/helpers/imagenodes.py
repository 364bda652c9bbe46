"""A tiny test plugin for run folders and the cache: deterministic images, a pass-through check, a stats writer.

``fake_image`` makes smooth images (they compress like photographs, unlike
noise) whose pixels depend on the seed; ``pass_check`` returns its images
unchanged and writes a small report, as ``safety_check`` does for safe images;
``stats`` returns nothing and only writes a file into the run folder.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import Field

from fluxkiln.engine import ImageItem, Images, RunContext, hookimpl, node

CALLS: list[str] = []


def smooth_image(seed: int, width: int, height: int):
    """An RGB gradient with a seed-dependent tint and a soft disc (deterministic)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = (seed * 37) % width, (seed * 53) % height
    disc = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * (0.15 * width) ** 2)))
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 128 + 127 * np.sin(seed + x / 97.0) * disc
    rgb = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


@node("fake_image", version="1")
def fake_image(ctx: RunContext, prompt: str = "", seed: int = 0,
               num_outputs: Annotated[int, Field(ge=1, le=4)] = 1,
               width: Annotated[int, Field(ge=8, le=2048)] = 32,
               height: Annotated[int, Field(ge=8, le=2048)] = 32) -> Images:
    """Smooth deterministic images; image i uses seed+i."""
    CALLS.append(ctx.node)
    out = Images()
    for i in range(num_outputs):
        out.append(ImageItem(image=smooth_image(seed + i, width, height), seed=seed + i, prompt=prompt,
                             name=f"{ctx.node}-{seed + i}",
                             meta={"node": ctx.node, "node_type": ctx.type, "params": dict(ctx.params),
                                   "model": "fake:model", "index": i}))
    return out


@node("pass_check", version="1")
def pass_check(ctx: RunContext, images: Images, pad: Annotated[int, Field(ge=0)] = 0) -> Images:
    """Pass images through unchanged (all 'safe') and write a report (padded by `pad` bytes) in place."""
    CALLS.append(ctx.node)
    path = ctx.node_dir() / "check.json"
    with open(path, "w") as f:  # in place, as many nodes write their reports
        f.write(json.dumps({"checked": len(images), "seeds": [it.seed for it in images], "run": ctx.run_id,
                            "pad": "x" * pad}))
    ctx.artifact(path)
    return Images(ImageItem(image=it.image, seed=it.seed, prompt=it.prompt, name=it.name, meta=dict(it.meta),
                            flags={**it.flags, "safe": True}) for it in images)


@node("stats", version="1")
def stats(ctx: RunContext, images: Images, label: str = "stats") -> None:
    """Return nothing; write the images' seeds and sizes to <node>/<label>.json."""
    CALLS.append(ctx.node)
    path = ctx.node_dir() / f"{label}.json"
    path.write_text(json.dumps([{"seed": it.seed, "size": list(it.image.size)} for it in images]))
    ctx.artifact(path)


@hookimpl
def register_node_types(register):
    for n in (fake_image, pass_check, stats):
        register(n)
