"""Shared helpers for the caption and safety tests: a fixture plugin feeding datasets and images to the Engine.

``fixture_dataset`` reads a folder of images (and ``<stem>.txt`` captions) into a
Dataset; ``fixture_colors`` makes solid-colour images.  They stand in for the
``dataset`` and ``sample`` nodes so these tests depend on nothing but the engine.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Annotated

from pydantic import Field

from fluxkiln.engine import Dataset, DatasetItem, FilePath, ImageItem, Images, RunContext, hookimpl, node

RED, ROSE, YELLOW, GRAY, BLUE = "#ff0000", "#ff0080", "#ffff00", "#808080", "#0000ff"


@node("fixture_dataset", version="1")
def fixture_dataset(ctx: RunContext, folder: FilePath) -> Dataset:
    """Images of a folder with their <stem>.txt captions."""
    from fluxkiln.engine.fingerprint import digest, hash_bytes_of

    items = []
    for p in sorted(Path(folder).glob("*.png")):
        txt = p.with_suffix(".txt")
        items.append(DatasetItem(path=p, caption=txt.read_text().strip() if txt.exists() else None, name=p.name))
    fp = digest([(it.name, hash_bytes_of(it.path), it.caption) for it in items])
    return Dataset(items=items, fingerprint=fp, root=Path(folder))


@node("fixture_colors", version="1")
def fixture_colors(ctx: RunContext, colors: Annotated[list[str], Field(description="#rrggbb")] = ["#808080"],  # noqa: B006
                   size: int = 40) -> Images:
    """Solid-colour images, one per colour."""
    from PIL import Image

    return Images(ImageItem(image=Image.new("RGB", (size, size + 8), c), seed=i, prompt=c, name=f"img{i}")
                  for i, c in enumerate(colors))


class FixturePlugin:
    @hookimpl
    def register_node_types(self, register):
        register(fixture_dataset)
        register(fixture_colors)


def engine(tmp_path: Path):
    """An Engine with the built-in plugins plus the fixture nodes, caching under ``tmp_path``."""
    from fluxkiln.engine.registry import Registry
    from fluxkiln.engine.runner import Engine

    return Engine(Registry.load(extra=[FixturePlugin()], entry_points=False), cache_dir=tmp_path / "cache")


def write_recipe(folder: Path, body: str, name: str = "t") -> Path:
    path = folder / "recipe.toml"
    path.write_text(f'[recipe]\nname = "{name}"\n\n' + textwrap.dedent(body))
    return path


def caption_recipe(folder: Path, **params) -> Path:
    """Write a recipe: ``fixture_dataset`` of ``folder/data`` as node ``data``, captioned by node ``cap`` with
    ``params`` (each written as JSON, in the order given)."""
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in params.items())
    data = '[nodes.data]\ntype = "fixture_dataset"\nfolder = "data"\n\n'
    return write_recipe(folder, data + '[nodes.cap]\ntype = "caption"\ndataset = "@data"\n' + lines)


def make_images(folder: Path, specs: dict[str, tuple[tuple[int, int, int], str | None]]) -> Path:
    """Write ``name.png`` images (solid colour) and, where given, ``name.txt`` captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, (rgb, cap) in specs.items():
        Image.new("RGB", (24, 20), rgb).save(folder / f"{name}.png")
        if cap is not None:
            (folder / f"{name}.txt").write_text(cap)
    return folder


def failure(result, node_id: str) -> dict:
    """The data of a node's node_failed event."""
    for e in result.events:
        if e.event == "node_failed" and e.node == node_id:
            return e.data
    raise AssertionError(f"node {node_id} did not fail: {result.nodes}")


def logs(result, node_id: str) -> list[str]:
    return [e.data["message"] for e in result.events if e.event == "node_log" and e.node == node_id]
