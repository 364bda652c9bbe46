"""recipes/dev-vs-schnell.toml validates (real and tiny models) and its schnell branch runs on the tiny model."""

from __future__ import annotations

from pathlib import Path

from fluxkiln.engine.cli import main as cli_main
from fluxkiln.engine.imagemeta import read_metadata
from fluxkiln.engine.runner import Engine

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "dev-vs-schnell.toml"
TINY = ["vars.dev_model=builtin:tiny-flux", "vars.schnell_model=builtin:tiny-flux-schnell"]


def test_recipe_validates(capsys):
    assert cli_main(["validate", str(RECIPE)]) == 0
    assert cli_main(["validate", str(RECIPE), *[a for s in TINY for a in ("--set", s)]]) == 0
    assert "22 nodes" in capsys.readouterr().out


def test_schnell_branch_runs_on_tiny_model(tmp_path, fresh_cache):
    res = Engine().run(RECIPE, overrides=[*TINY, "vars.schnell_steps=1"], only=["save_schnell"],
                       output=tmp_path / "run")
    assert res.status == "ok", [e.to_dict() for e in res.events if e.event == "node_failed"]
    assert sorted(n for n, s in res.nodes.items() if s == "ran") == ["save_schnell", "schnell", "schnell_4"]
    meta = read_metadata(tmp_path / "run" / "schnell_4_0.webp")
    assert (meta["node"], meta["seed"], meta["saved_by"]) == ("schnell_4", 1234, "save_schnell")
    assert meta["params"]["width"] == 512 and meta["params"]["variant"] == "schnell"
