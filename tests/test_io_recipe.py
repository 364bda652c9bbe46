"""recipes/dev-vs-schnell.toml validates (mini-flux, real and tiny models) and its schnell branch runs on the tiny model."""

from __future__ import annotations

from pathlib import Path

from fluxkiln.engine.cli import main as cli_main
from fluxkiln.engine.runner import Engine

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "dev-vs-schnell.toml"
TINY = ["vars.dev_model=builtin:tiny-flux", "vars.schnell_model=builtin:tiny-flux-schnell"]


def test_recipe_validates(capsys):
    assert cli_main(["validate", str(RECIPE)]) == 0
    assert cli_main(["validate", str(RECIPE), *[a for s in TINY for a in ("--set", s)]]) == 0
    real = ["vars.dev_model=black-forest-labs/FLUX.1-dev", "vars.schnell_model=black-forest-labs/FLUX.1-schnell",
            "vars.metric=clip", 'vars.megapixels="1"']  # as the recipe's header says, for the real models
    assert cli_main(["validate", str(RECIPE), *[a for s in real for a in ("--set", s)]]) == 0
    assert "16 nodes, 4 swept into 21 cells" in capsys.readouterr().out


def test_schnell_steps_sweep_runs_on_tiny_model(tmp_path, fresh_cache):
    res = Engine().run(RECIPE, overrides=[*TINY, "nodes.schnell_steps.sweep.num_inference_steps=[1]"],
                       only=["schnell_steps"], output=tmp_path / "run")
    assert res.status == "ok", [e.to_dict() for e in res.events if e.event == "node_failed"]
    assert sorted(n for n, s in res.nodes.items() if s == "ran") == [
        "dev", "schnell", "schnell_steps", "schnell_steps[num_inference_steps=1]"]
    [image] = res.outputs["schnell_steps"]["output"]
    assert (image.seed, image.meta["width"], image.meta["variant"]) == (1234, 512, "schnell")
    assert image.meta["sweep"]["values"] == {"num_inference_steps": 1}


def test_explain_lists_every_cell_with_its_reason(capsys, tmp_path):
    args = ["run", str(RECIPE), "--explain", "--output", str(tmp_path / "run"),
            *[a for s in TINY for a in ("--set", s)]]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "study[prompt=#2,aspect_ratio=9:16,model=schnell] sample" in out
    assert "dev_guidance[guidance=1.5] sample" in out and "run    (no cached result)" in out
    assert out.count("sweep ") == 4  # the four join nodes
