"""save, grid and inspect through the real Engine, with a small deterministic sampler plugin (no FLUX).

The sampler follows the `sample` node's contract: image i of a batch uses seed+i
and its meta records the node, its parameters and the model.
"""

from __future__ import annotations

import random
import tomllib
from typing import Annotated

from pydantic import Field

from fluxkiln.engine import ImageItem, Images, RunContext, hookimpl, node
from fluxkiln.engine.imagemeta import read_metadata
from fluxkiln.engine.inspect_cmd import main as inspect_main
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine


@node("fake_sample", version="1")
def fake_sample(ctx: RunContext, prompt: str = "", seed: int = 0,
                num_outputs: Annotated[int, Field(ge=1, le=4)] = 1) -> Images:
    """Deterministic noise images: image i is drawn from seed+i."""
    from PIL import Image

    out = Images()
    for i in range(num_outputs):
        rng = random.Random(f"{prompt}|{seed + i}")
        im = Image.frombytes("RGB", (16, 16), bytes(rng.randrange(256) for _ in range(16 * 16 * 3)))
        out.append(ImageItem(image=im, seed=seed + i, prompt=prompt,
                             meta={"node": ctx.node, "node_type": ctx.type, "params": dict(ctx.params),
                                   "model": "fake:model", "index": i}))
    return out


class FakePlugin:
    @hookimpl
    def register_node_types(self, register):
        register(fake_sample)


RECIPE = """\
[recipe]
name = "io-engine"

[vars]
seed = 10

[nodes.gen]
type = "fake_sample"
prompt = "noise"
seed = "${seed}"
num_outputs = 3

[nodes.sheet]
type = "grid"
images = "@gen"
label_from = "seed"
cell_size = 32

[nodes.saved]
type = "save"
images = "@gen"
output_format = "png"

[nodes.sheet_saved]
type = "save"
images = "@sheet"
output_format = "webp"
"""


def _engine(cache):
    return Engine(Registry.load([FakePlugin()], entry_points=False), cache_dir=cache)


def test_run_save_inspect_and_reproduce(tmp_path, fresh_cache, capsys):
    recipe = tmp_path / "study.toml"
    recipe.write_text(RECIPE)
    engine = _engine(fresh_cache)
    res = engine.run(recipe, overrides=['nodes.gen.prompt="other noise"'], output=tmp_path / "run1")
    assert res.status == "ok", [e.to_dict() for e in res.events if e.event == "node_failed"]
    run1 = tmp_path / "run1"
    assert sorted(p.name for p in run1.glob("*_*.*")) == ["saved_0.png", "saved_1.png", "saved_2.png",
                                                          "sheet_saved_0.webp"]
    assert res.artifacts("saved") == [str(run1 / f"saved_{i}.png") for i in range(3)]
    assert res.outputs["saved"]["output"][1].meta["path"] == str(run1 / "saved_1.png")
    meta = read_metadata(run1 / "saved_2.png")
    assert (meta["seed"], meta["node"], meta["prompt"]) == (12, "gen", "other noise")
    assert meta["overrides"] == ['nodes.gen.prompt="other noise"']

    out = tmp_path / "repro" / "again.toml"
    assert inspect_main([str(run1 / "saved_2.png"), "--write-recipe", str(out)]) == 0
    data = tomllib.loads(out.read_text())
    assert data["nodes"]["gen"]["seed"] == 12 and data["nodes"]["gen"]["num_outputs"] == 1
    assert sorted(data["nodes"]) == ["gen", "saved"]  # only what makes and saves this image
    res2 = _engine(fresh_cache).run(out, output=tmp_path / "run2")
    assert res2.status == "ok"
    from PIL import Image

    with Image.open(run1 / "saved_2.png") as a, Image.open(tmp_path / "run2" / "saved_0.png") as b:
        assert a.tobytes() == b.tobytes()  # the same pixels: the recipe reproduces that image

    # the grid image: its metadata says it is a grid, and inspect writes the recipe unchanged
    grid_meta = read_metadata(run1 / "sheet_saved_0.webp")
    assert grid_meta["node_type"] == "grid" and grid_meta["saved_by"] == "sheet_saved"
    assert [c["seed"] for c in grid_meta["meta"]["cells"][0]] == [10, 11]
    capsys.readouterr()
    assert inspect_main([str(run1 / "sheet_saved_0.webp"), "--write-recipe", str(tmp_path / "g.toml")]) == 0
    assert "grid" in capsys.readouterr().err
    assert sorted(tomllib.loads((tmp_path / "g.toml").read_text())["nodes"]) == ["gen", "sheet", "sheet_saved"]
    assert inspect_main([str(run1 / "saved_0.png"), "--write-recipe", str(tmp_path / "f.toml"), "--full"]) == 0
    assert len(tomllib.loads((tmp_path / "f.toml").read_text())["nodes"]) == 4


def test_second_run_caches_grid_and_puts_deleted_files_back(tmp_path, fresh_cache):
    recipe = tmp_path / "study.toml"
    recipe.write_text(RECIPE)
    engine = _engine(fresh_cache)
    assert engine.run(recipe, output=tmp_path / "run").status == "ok"
    original = (tmp_path / "run" / "saved_1.png").read_bytes()
    (tmp_path / "run" / "saved_1.png").unlink()
    res = engine.run(recipe, output=tmp_path / "run")
    assert res.nodes["gen"] == "cached" and res.nodes["sheet"] == "cached"
    assert res.nodes["saved"] == "cached"  # its file was deleted: the cached copy is put back
    assert not [e for e in res.events if e.event == "node_started"]
    assert (tmp_path / "run" / "saved_1.png").read_bytes() == original
    assert not (tmp_path / "run" / "saved_1-2.png").exists()
