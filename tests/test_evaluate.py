"""The evaluate node: the mini metric (pixel checker) and the CLIP metric (a tiny CLIP built in code),
scores on the images, in scores.json, in the run report and in saved files; and its failures."""

from __future__ import annotations

import json
import random

import pytest
from flux_support import failure, run_body

from fluxkiln.engine.runner import Engine
from fluxkiln.plugins.miniflux import render, world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(cache_dir=tmp_path_factory.mktemp("cache"))


def scene_png(folder, scene: world.Scene, name: str) -> str:
    """A rendered scene as a 512x512 PNG (the size sample gives a square input at 0.25 MP, so it is kept)."""
    image = render.to_pil(render.render([world.realise(scene, random.Random(0))], 512, 512, supersample=1))[0]
    image.save(folder / name)
    return name


def images_of(folder, files_and_prompts: list[tuple[str, str]]) -> str:
    """Recipe nodes giving each file, unchanged, as an image with the prompt (sample, prompt_strength 0)."""
    body = '[nodes.m]\ntype = "load_model"\nmodel = "builtin:mini-flux-schnell"\n'
    for i, (file, prompt) in enumerate(files_and_prompts):
        body += (f'[nodes.i{i}]\ntype = "sample"\nmodel = "@m"\nimage = "{file}"\nprompt_strength = 0.0\n'
                 f'prompt = "{prompt}"\nmegapixels = "0.25"\nseed = {i}\n')
    return body


HEXAGON = world.Scene((world.Obj("red", "hexagon", "large", "top left"),), "blue")
STARS = world.Scene((world.Obj("yellow", "star", "small", "right"), world.Obj("white", "circle", "large", "left")),
                    "purple")


def test_mini_metric_scores_each_image_and_reports_everywhere(engine, tmp_path):
    from fluxkiln.engine.imagemeta import read_metadata

    files = [(scene_png(tmp_path, STARS, "stars.png"), STARS.prompt),
             (scene_png(tmp_path, STARS, "stars2.png"), "a small green triangle at the top on a purple background")]
    body = images_of(tmp_path, files).replace("seed = 0", "seed = 0\nnum_outputs = 2") + """
[nodes.scored]
type = "evaluate"
images = "@i0"
metric = "mini"
[nodes.wrong]
type = "evaluate"
images = "@i1"
[nodes.saved]
type = "save"
images = "@scored"
output_format = "png"
"""
    result = run_body(engine, tmp_path, body, "mini")
    run_dir = tmp_path / "runs" / "mini"
    data = json.loads((run_dir / "scored" / "scores.json").read_text())
    assert data["metric"] == "mini" and data["count"] == 2
    assert all(row["scores"]["score"] == 1.0 and row["scores"]["all"] == 1.0 for row in data["images"])
    assert data["mean"]["all"] == 1.0 and data["mean"]["position"] == 1.0
    wrong = json.loads((run_dir / "wrong" / "scores.json").read_text())["images"][0]["scores"]
    assert wrong["shape"] == 0.0 and wrong["position"] == 0.0 and wrong["background"] == 1.0 and wrong["all"] == 0.0
    assert result.outputs["wrong"]["output"][0].meta["scores"]["score"] == wrong["score"] < 1.0
    assert [item.meta["scores"]["all"] for item in result.outputs["scored"]["output"]] == [1.0, 1.0]
    report = json.loads((run_dir / "report.json").read_text())
    row = next(r for r in report["nodes"] if r["node"] == "scored")
    assert row["scores"]["mean"] == data["mean"]
    md = (run_dir / "report.md").read_text()
    assert "## Scores" in md and STARS.prompt in md
    saved = read_metadata(run_dir / "saved_0.png")
    assert saved["meta"]["scores"]["all"] == 1.0
    assert "scores" not in (saved.get("params") or {})


def test_aliases_name_a_lora_trigger_word_and_unknown_shapes_are_refused(engine, tmp_path):
    files = [(scene_png(tmp_path, HEXAGON, "hex.png"), "a large red TOK at the top left on a blue background")]
    body = images_of(tmp_path, files) + '[nodes.e]\ntype = "evaluate"\nimages = "@i0"\naliases = { TOK = "hexagon" }\n'
    result = run_body(engine, tmp_path, body, "alias")
    assert result.outputs["e"]["output"][0].meta["scores"]["shape"] == 1.0
    plain = run_body(engine, tmp_path, body.replace('aliases = { TOK = "hexagon" }', ""), "noalias")
    assert plain.outputs["e"]["output"][0].meta["scores"]["shape"] is None  # TOK is no shape word
    bad = run_body(engine, tmp_path, body.replace('"hexagon"', '"heptagon"'), "badalias", expect="failed")
    info = failure(bad, "e")
    assert info["key"] == "aliases" and "heptagon" in info["error"] and "hexagon" in info["hint"]


def test_images_without_a_prompt_are_refused(engine, tmp_path):
    body = images_of(tmp_path, [(scene_png(tmp_path, HEXAGON, "p.png"), "")])
    body += '[nodes.e]\ntype = "evaluate"\nimages = "@i0"\n'
    info = failure(run_body(engine, tmp_path, body, "noprompt", expect="failed"), "e")
    assert "has no prompt" in info["error"] and info["key"] == "images"


def test_clip_metric_with_a_tiny_clip_built_in_code(engine, tmp_path):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from fluxkiln.plugins.evaluate.tinyclip import tiny_clip_path

    files = [(scene_png(tmp_path, STARS, "c.png"), STARS.prompt), (scene_png(tmp_path, HEXAGON, "d.png"), "a dog")]
    body = images_of(tmp_path, files) + """
[nodes.e]
type = "evaluate"
images = "@i0"
metric = "clip"
clip_model = "builtin:tiny-clip"
[nodes.f]
type = "evaluate"
images = "@i1"
metric = "clip"
clip_model = "builtin:tiny-clip"
"""
    result = run_body(engine, tmp_path, body, "clip")
    data = json.loads((tmp_path / "runs" / "clip" / "e" / "scores.json").read_text())
    other = json.loads((tmp_path / "runs" / "clip" / "f" / "scores.json").read_text())
    scores = [data["images"][0]["scores"]["clip_score"], other["images"][0]["scores"]["clip_score"]]
    # the same score straight from transformers: 100 x cosine similarity of the projected embeddings
    folder = str(tiny_clip_path())
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    items = [result.outputs["e"]["output"][0], result.outputs["f"]["output"][0]]
    for item, score in zip(items, scores, strict=True):
        inputs = processor(text=[item.prompt], images=[item.image], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
        assert score == pytest.approx(100 * max(cos, 0.0), abs=1e-3)
        assert item.meta["scores"]["metric"] == "clip"
    assert scores[0] != scores[1]
    assert data["mean"]["clip_score"] == scores[0] and data["model"] == "builtin:tiny-clip"


def test_clip_model_missing_from_the_cache_says_how_to_get_it(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    body = images_of(tmp_path, [(scene_png(tmp_path, HEXAGON, "m.png"), HEXAGON.prompt)])
    body += '[nodes.e]\ntype = "evaluate"\nimages = "@i0"\nmetric = "clip"\n'
    info = failure(run_body(engine, tmp_path, body, "noclip", expect="failed"), "e")
    assert info["key"] == "clip_model" and "openai/clip-vit-large-patch14" in info["error"]
    assert "hf download openai/clip-vit-large-patch14" in info["hint"]
    folder = tmp_path / "notclip"
    folder.mkdir()
    body = body.replace('metric = "clip"', 'metric = "clip"\nclip_model = "notclip"')
    info = failure(run_body(engine, tmp_path, body, "notclip", expect="failed"), "e")
    assert info["key"] == "clip_model" and "config.json" in info["error"]
