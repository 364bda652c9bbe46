"""Tests of the resize and load_images nodes, with fluxkiln's pytest fixtures."""

import pytest

import fluxkiln_example
from fluxkiln.engine import Cancelled
from fluxkiln.engine.testing import make_images
from fluxkiln_example.images import resize, target_size

pytestmark = pytest.mark.fluxkiln_plugin(fluxkiln_example)

RECIPE = """
[recipe]
name = "resize-test"

[nodes.pictures]
type = "test_images"
count = 2
width = 64
height = 48

[nodes.bigger]
type = "resize"
images = "@pictures"
scale = 2.0
"""


def test_upscale_in_a_recipe_keeps_aspect_and_metadata(run_recipe):
    run = run_recipe(RECIPE)
    out = run.output("bigger")
    assert [item.image.size for item in out] == [(128, 96), (128, 96)]
    assert [item.seed for item in out] == [0, 1]
    assert out[0].meta["resize"] == {"from": [64, 48], "to": [128, 96], "method": "lanczos"}
    assert [e.data["step"] for e in run.events_of("node_progress", "bigger")] == [1, 2]


def test_second_run_is_cached(run_recipe):
    run_recipe(RECIPE)
    again = run_recipe(RECIPE)
    assert again.nodes == {"pictures": "cached", "bigger": "cached"}


@pytest.mark.parametrize(("kwargs", "size"), [
    ({"width": 32}, (32, 24)),
    ({"height": 96}, (128, 96)),
    ({"width": 100, "height": 100, "fit": "contain"}, (100, 75)),
    ({"width": 100, "height": 100, "fit": "cover"}, (100, 100)),
    ({"width": 100, "height": 30, "fit": "stretch"}, (100, 30)),
    ({"scale": 1.5, "multiple_of": 16}, (96, 80)),
])
def test_target_sizes(kwargs, size):
    args = {"scale": None, "width": None, "height": None, "fit": "contain", "multiple_of": 1} | kwargs
    assert target_size((64, 48), **args)[0] == size


def test_cover_crops_the_centre(fluxkiln_context):
    from PIL import Image

    img = Image.new("RGB", (300, 100), "red")
    img.paste(Image.new("RGB", (100, 100), "blue"), (100, 0))
    images = make_images(1)
    images[0].image = img
    out = resize(fluxkiln_context(), images=images, width=50, height=50, fit="cover", method="nearest")
    assert out[0].image.size == (50, 50)
    assert out[0].image.getpixel((25, 25)) == (0, 0, 255)
    assert out[0].image.getpixel((0, 0)) == (0, 0, 255)


def test_missing_size_is_a_validation_error(validate_recipe):
    problems = validate_recipe(RECIPE.replace("scale = 2.0", ""))
    assert [(p.node, p.message) for p in problems] == [("bigger", "resize needs `scale`, or `width` and/or `height`")]


def test_scale_out_of_range_is_a_validation_error(validate_recipe):
    problems = validate_recipe(RECIPE.replace("scale = 2.0", "scale = 20.0"))
    assert [(p.node, p.key) for p in problems] == [("bigger", "scale")]


def test_too_large_output_is_refused(run_recipe):
    run = run_recipe(RECIPE.replace("scale = 2.0", "width = 16000\nheight = 16000\nfit = \"stretch\""),
                     expect="failed")
    failure = run.failure("bigger")
    assert failure["plugin"] == "example"
    assert "pixels" in failure["error"]


def test_resize_stops_when_cancelled(fluxkiln_context):
    ctx = fluxkiln_context()
    ctx.cancel()
    with pytest.raises(Cancelled):
        resize(ctx, images=make_images(2), scale=2.0)


def test_load_images_from_a_folder(run_recipe, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, item in enumerate(make_images(3, 40, 20, pattern="noise")):
        item.image.save(folder / f"img{i + 1}.png")
    item.image.convert("P").save(folder / "img10.png")
    (folder / "img2.txt").write_text("a caption\n")
    (folder / "notes.md").write_text("not an image")
    run = run_recipe("""
[recipe]
name = "load"

[nodes.pics]
type = "load_images"
path = "pics"

[nodes.half]
type = "resize"
images = "@pics"
scale = 0.5
""")
    out = run.output("pics")
    assert [item.name for item in out] == ["img1", "img2", "img3", "img10"]
    assert out[1].prompt == "a caption"
    assert {item.image.mode for item in out} == {"RGB"}
    assert [item.image.size for item in run.output("half")] == [(20, 10)] * 4


def test_load_images_reports_a_broken_file(run_recipe, tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "bad.png").write_bytes(b"not a png")
    run = run_recipe('[recipe]\nname = "bad"\n[nodes.pics]\ntype = "load_images"\npath = "pics"\n', expect="failed")
    assert "cannot read image" in run.failure("pics")["error"]
    assert run.failure("pics")["key"] == "path"


def test_shipped_upscale_recipe_is_valid(validate_recipe):
    from pathlib import Path

    recipe = Path(__file__).parent.parent / "recipes" / "upscale.toml"
    assert [p.format() for p in validate_recipe(recipe)] == []
