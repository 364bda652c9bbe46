"""End to end with the tiny built-in FLUX model: sample -> save -> inspect --write-recipe -> run -> same pixels."""

from __future__ import annotations

import tomllib

from PIL import Image

from fluxkiln.engine.imagemeta import read_metadata
from fluxkiln.engine.inspect_cmd import main as inspect_main
from fluxkiln.engine.runner import Engine

RECIPE = """\
[recipe]
name = "io-flux"

[vars]
model = "black-forest-labs/FLUX.1-dev"

[nodes.base]
type = "load_model"
model = "${model}"

[nodes.other]
type = "sample"
model = "@base"
prompt = "not this one"
aspect_ratio = "custom"
width = 256
height = 256
megapixels = "0.25"
num_inference_steps = 1
seed = 1

[nodes.images]
type = "sample"
model = "@base"
prompt = "a lighthouse"
aspect_ratio = "custom"
width = 256
height = 256
megapixels = "0.25"
num_outputs = 2
num_inference_steps = 2
seed = 7

[nodes.saved]
type = "save"
images = "@images"
output_format = "png"
"""


def test_inspect_recipe_reproduces_second_image_of_a_batch(tmp_path, fresh_cache, capsys):
    recipe = tmp_path / "flux.toml"
    recipe.write_text(RECIPE)
    engine = Engine()
    res = engine.run(recipe, overrides=["vars.model=builtin:tiny-flux"], output=tmp_path / "run1")
    assert res.status == "ok", [e.to_dict() for e in res.events if e.event == "node_failed"]
    second = tmp_path / "run1" / "saved_1.png"
    meta = read_metadata(second)
    assert (meta["node"], meta["seed"], meta["model"]) == ("images", 8, "builtin:tiny-flux")
    assert meta["params"]["num_inference_steps"] == 2

    out = tmp_path / "again.toml"
    assert inspect_main([str(second), "--write-recipe", str(out)]) == 0
    data = tomllib.loads(out.read_text())
    assert sorted(data["nodes"]) == ["base", "images", "saved"]
    assert data["vars"]["model"] == "builtin:tiny-flux"  # the run's --set is part of the recipe
    res2 = engine.run(out, output=tmp_path / "run2")
    assert res2.status == "ok"
    assert res2.nodes["images"] == "ran"
    with Image.open(second) as a, Image.open(tmp_path / "run2" / "saved_0.png") as b, \
            Image.open(tmp_path / "run1" / "saved_0.png") as first:
        assert a.size == b.size == (128, 128)
        same, other = _diff(a, b), _diff(a, first)
    # batch of 2 vs batch of 1 may differ in float rounding (a level or two of 255), never in content
    assert same[0] <= 3 and same[1] < 0.05, same
    assert other[1] > 10 * max(same[1], 0.01), (same, other)  # the wrong seed gives another picture


def _diff(a, b) -> tuple[int, float]:
    """(max, mean) absolute difference of two RGB images, in levels of 255."""
    pa, pb = a.convert("RGB").tobytes(), b.convert("RGB").tobytes()
    diffs = [abs(x - y) for x, y in zip(pa, pb, strict=True)]
    return max(diffs), sum(diffs) / len(diffs)
