"""Generation on the tiny FLUX models: prompt lists, sample-level LoRA scale in a sweep, large sizes,
the dev + schnell hybrid (shared encoders and VAE); the dev-vs-schnell sweep recipe on mini-flux, scored per cell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flux_support import pixels, recipe, run
from fluxkiln.engine.imagemeta import read_metadata
from fluxkiln.engine.runner import Engine
from fluxkiln.plugins.flux.sizes import plan_size
from helpers.recipes import SQUARE_256, load_tiny, node, sample

ROOT = Path(__file__).resolve().parent.parent
TINY = ["vars.dev_model=builtin:tiny-flux", "vars.schnell_model=builtin:tiny-flux-schnell"]
SMALL = {**SQUARE_256, "num_inference_steps": 2, "go_fast": False}
SCHNELL = load_tiny(model="builtin:tiny-flux-schnell")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(cache_dir=tmp_path_factory.mktemp("generation-cache"))


def test_a_prompt_list_makes_num_outputs_per_prompt_with_the_same_seeds(engine, tmp_path):
    body = (load_tiny() + sample("both", prompt=["a cat", "a dog"], num_outputs=2, seed=7, **SMALL)
            + sample("dog", prompt="a dog", num_outputs=2, seed=7, **SMALL)
            + node("kept", "save", images="@both", output_format="png"))
    result = run(engine, recipe(tmp_path, body))
    both = result.outputs["both"]["output"]
    assert [(i.prompt, i.seed, i.meta["prompt_index"]) for i in both] == [
        ("a cat", 7, 0), ("a cat", 8, 0), ("a dog", 7, 1), ("a dog", 8, 1)]
    # the prompts share seeds, not names; a saved image still names the node that made it
    assert [i.name for i in both] == ["both-1-7", "both-1-8", "both-2-7", "both-2-8"]
    assert [i.name for i in result.outputs["dog"]["output"]] == ["dog-7", "dog-8"]
    saved = read_metadata(Path(result.outputs["kept"]["output"][2].meta["path"]))
    assert (saved["node"], saved["node_type"], saved["seed"], saved["prompt"]) == ("both", "sample", 7, "a dog")
    assert all(i.meta["prompt"] == i.prompt and i.meta["seed"] == i.seed for i in both)
    assert both[0].meta["timing"]["batch"] == 4 and both[0].meta["timing"]["steps"] == 2
    dog = result.outputs["dog"]["output"]
    assert np.abs(pixels(both[2]) - pixels(dog[0])).mean() < 1.0  # batched with the cat, still the dog of seed 7
    assert np.abs(pixels(both[0]) - pixels(both[2])).mean() > 1.0  # the prompt matters


def test_lora_scale_sweep_on_sample(engine, tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"transformer.single_transformer_blocks.0.proj_out.lora_A.weight": torch.randn(4, 160, generator=g),
               "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": torch.randn(32, 4, generator=g)},
              tmp_path / "l.safetensors")
    body = (load_tiny() + node("styled", "apply_lora", model="@base", lora="l.safetensors", lora_scale=0.8)
            + sample("plain", prompt="a cat", seed=3, **SMALL)
            + sample("scaled", "@styled", prompt="a cat", seed=3, **SMALL)
            + "[nodes.scaled.sweep]\nlora_scale = [0.0, 1.0, 0.5]\n")
    result = run(engine, recipe(tmp_path, body))
    zero, one, half = result.outputs["scaled"]["output"]
    assert [i.meta["loras"][0]["scale"] for i in (zero, one, half)] == [0.0, 0.8, 0.4]
    assert [i.meta["sweep"]["values"]["lora_scale"] for i in (zero, one, half)] == [0.0, 1.0, 0.5]
    plain = result.outputs["plain"]["output"][0]
    if torch.cuda.is_available():
        # on a GPU the scale-0 LoRA's graph may get other kernels (Inductor autotunes by timing on a busy host): seen
        # 4 levels apart in places; a LoRA applied at the wrong scale would be its effect away
        effect = np.abs(pixels(one) - pixels(plain)).mean()
        assert np.abs(pixels(zero) - pixels(plain)).mean() < effect / 10, effect
    else:
        assert np.abs(pixels(zero) - pixels(plain)).max() <= 1
    assert np.abs(pixels(one) - pixels(plain)).mean() > 1 and np.abs(pixels(one) - pixels(half)).mean() > 0.5


def test_full_hd_is_cropped_from_1088_and_large_sizes_warn(engine, tmp_path):
    assert plan_size("16:9", "2") == ((1920, 1088), (1920, 1080))
    assert plan_size("9:16", "2") == ((1088, 1920), (1080, 1920))
    assert plan_size("21:9", "2")[1] == (2048, 848)  # 2 MP of 21:9 would pass 2048 per side
    once = {"num_inference_steps": 1, "seed": 1, "go_fast": False}
    body = (SCHNELL + sample("hd", aspect_ratio="16:9", megapixels="2", **once)
            + sample("wide", aspect_ratio="custom", width=2048, height=1280, **once))
    result = run(engine, recipe(tmp_path, body))
    hd, wide = result.outputs["hd"]["output"][0], result.outputs["wide"]["output"][0]
    assert hd.image.size == (1920, 1080) and (hd.meta["width"], hd.meta["height"]) == (1920, 1080)
    assert wide.image.size == (2048, 1280)
    warnings = {e.node: e.data["message"] for e in result.events
                if e.event == "node_log" and e.data.get("level") == "warning"}
    assert "hd" not in warnings and "above the model's training resolution" in warnings["wide"]


def test_custom_sizes_go_to_2048_per_side_and_no_further(engine, tmp_path):
    from fluxkiln.engine.errors import RecipeInvalid
    from fluxkiln.plugins.flux.sizes import output_size

    assert output_size("custom", "1", 2048, 2048) == (2048, 2048)
    assert output_size("custom", "2", 2048, 1024) == (2048, 1024)  # 2 MP scaling stops at 2048 per side
    body = SCHNELL + sample("huge", aspect_ratio="custom", width=2064, height=2048)
    with pytest.raises(RecipeInvalid) as err:
        engine.check(recipe(tmp_path, body))
    [problem] = err.value.problems
    assert problem.key == "width" and "2048" in problem.message


def test_hybrid_recipe_end_to_end_with_one_copy_of_the_encoders(engine, tmp_path):
    path = ROOT / "recipes" / "hybrid.toml"
    sets = TINY + ['vars.megapixels="0.25"', "vars.refine_steps=4", "nodes.dev_only.num_inference_steps=2",
                   'vars.prompts=["a fox", "a boat"]']
    result = engine.run(path, overrides=sets, output=tmp_path / "hybrid")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    draft, refined = result.outputs["draft"]["output"], result.outputs["refined"]["output"]
    assert [i.prompt for i in refined] == ["a fox", "a boat"]  # each draft refined with its own prompt
    assert refined[0].meta["variant"] == "dev" and refined[0].meta["image"] == draft[0].name
    assert refined[0].meta["timing"]["steps"] == 3  # 4 steps at strength 0.6: the last 3 run
    assert np.abs(pixels(refined[0]) - pixels(draft[0])).mean() > 0.5
    dev = result.outputs["dev"]["output"].get()
    schnell = result.outputs["schnell"]["output"].get()
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert getattr(dev, name) is getattr(schnell, name), name
    assert dev.transformer is not schnell.transformer
    from fluxkiln.plugins.flux.load import pipeline_bytes

    encoders = sum(p.numel() * p.element_size() for p in schnell.text_encoder_2.parameters())
    assert pipeline_bytes(dev) < pipeline_bytes(schnell) - encoders  # the borrowed parts are not counted twice
    assert (tmp_path / "hybrid" / "hybrid_0.png").is_file()


def test_shared_modules_survive_evicting_either_model(engine, tmp_path):
    from fluxkiln.plugins.flux.load import release_pipeline

    body = load_tiny("schnell", "builtin:tiny-flux-schnell") + load_tiny("dev", share="@schnell")
    result = run(Engine(cache_dir=tmp_path / "c"), recipe(tmp_path, body))
    schnell, dev = result.outputs["schnell"]["output"].get(), result.outputs["dev"]["output"].get()
    release_pipeline(schnell)
    here = "cuda" if torch.cuda.is_available() else "cpu"  # load_model places the pipelines on the GPU if any
    assert dev.vae.device.type == here and schnell.transformer.device.type == "meta"
    release_pipeline(dev)
    assert dev.transformer.device.type == "meta"


def test_share_refuses_a_different_dtype(engine, tmp_path):
    # both dtypes explicit: "auto" is bfloat16 on a GPU, which would make the two the same there
    body = (load_tiny("schnell", "builtin:tiny-flux-schnell", dtype="float32")
            + load_tiny("dev", dtype="bfloat16", share="@schnell"))
    result = run(engine, recipe(tmp_path, body), expect="failed")
    [failed] = [e.data for e in result.events if e.event == "node_failed"]
    assert failed["key"] == "share" and "same dtype" in failed["hint"]


def _cell_means(scores_json: Path) -> dict[str, dict[str, float]]:
    """Cell id -> mean of each numeric score over its images, straight from an evaluate node's scores.json."""
    by_cell: dict[str, list[dict]] = {}
    for row in json.loads(scores_json.read_text())["images"]:
        by_cell.setdefault(row["sweep"]["cell"], []).append(row["scores"])
    return {cell: {k: round(float(np.mean([s[k] for s in rows if s[k] is not None])), 4)
                   for k in rows[0] if any(s[k] is not None for s in rows)} for cell, rows in by_cell.items()}


def test_dev_vs_schnell_recipe_on_mini_flux_reports_scores_per_cell(engine, tmp_path):
    path = ROOT / "recipes" / "dev-vs-schnell.toml"  # mini-flux by default, scored by the pixel checker
    sets = ['nodes.study.sweep.aspect_ratio=["1:1"]', "nodes.study.num_inference_steps=2",
            "nodes.dev_steps.sweep.num_inference_steps=[1, 2]", "nodes.schnell_steps.sweep.num_inference_steps=[1]",
            "vars.dev_steps=2", "nodes.dev_guidance.sweep.guidance=[1.5, 6.0]"]
    result = engine.run(path, overrides=sets, output=tmp_path / "dvs")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    grids = result.outputs["study_grids"]["output"]
    assert [g.meta["page"]["prompt"] for g in grids] == [
        "a large red circle at the top left on a blue background",
        "a small yellow star in the center on a purple background"]  # a grid per prompt of mini-flux's world
    assert (grids[0].meta["rows"], grids[0].meta["columns"]) == (1, 2)  # one aspect ratio, two models
    steps = result.outputs["steps_grid"]["output"][0]
    assert [[c is not None for c in row] for row in steps.meta["cells"]] == [[True, True], [True, False]]
    report = json.loads((tmp_path / "dvs" / "report.json").read_text())
    tables = {t["node"]: t for t in report["sweeps"]}
    study = tables["study"]
    assert study["axes"] == ["prompt", "aspect_ratio", "model"] and study["scored_by"][0]["node"] == "study_scores"
    assert {r["model"] for r in study["rows"]} == {"dev", "schnell"}
    assert all(r["seconds_per_step"] > 0 and r["cost_per_image"] > 0 for r in study["rows"])
    means = _cell_means(tmp_path / "dvs" / "study_scores" / "scores.json")
    for r in study["rows"]:  # the mean score and every attribute the prompts name, per cell
        assert {k: r[f"score:{k}"] for k in ("score", "colour", "shape", "size", "position", "background")} == {
            k: means[r["cell"]][k] for k in ("score", "colour", "shape", "size", "position", "background")}
    for name in ("dev_steps", "schnell_steps", "dev_guidance"):
        assert all("score:score" in r and r["scored"] == 1 for r in tables[name]["rows"]), name
    md = (tmp_path / "dvs" / "report.md").read_text()
    assert "Scores: `study_scores` (mini, mini-flux pixel checker)" in md
    assert (tmp_path / "dvs" / "study_1.png").is_file() and (tmp_path / "dvs" / "steps_0.png").is_file()
    prompts = ('vars.prompts=["a large red circle at the top left on a blue background", '
               '"a small yellow star in the center on a purple background", '
               '"a small white square on a black background"]')
    wider = engine.run(path, overrides=[*sets, prompts], output=tmp_path / "dvs")
    ran = [e.node for e in wider.events if e.event == "node_started" and e.type in ("sample", "evaluate")]
    assert ran == ["study[prompt=#3,aspect_ratio=1:1,model=dev]", "study[prompt=#3,aspect_ratio=1:1,model=schnell]",
                   "study_scores"]
    rows = json.loads((tmp_path / "dvs" / "report.json").read_text())["sweeps"][0]["rows"]
    assert [r["state"] for r in rows] == ["cached"] * 4 + ["ran"] * 2 and all("score:shape" in r for r in rows)
    assert [r["score:score"] for r in rows[:4]] == [r["score:score"] for r in study["rows"]]

