"""LoRA training on mini-flux: the bowtie concept ("TOK") from the 8 bundled captioned images, scored by
the pixel checker (the full-size measurement is `python -m fluxkiln.plugins.miniflux.concept measure`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ROOT

from fluxkiln.engine.runner import Engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECIPE = ROOT / "tests" / "recipes" / "lora-bowtie.toml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-bowtie")
    result = Engine(cache_dir=tmp / "cache").run(RECIPE, output=tmp / "run")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    return result, tmp / "run"


def _scores(run_dir, node: str) -> list[dict]:
    return [row["scores"] for row in json.loads((run_dir / node / "scores.json").read_text())["images"]]


def test_a_lora_trains_on_mini_flux_and_changes_its_pictures(run):
    result, run_dir = run
    styled = [np.asarray(it.image, dtype=np.float64) for it in result.outputs["with_trigger"]["output"]]
    plain = [np.asarray(it.image, dtype=np.float64) for it in result.outputs["plain"]["output"]]
    assert all(a.shape == (128, 128, 3) for a in styled)
    assert np.mean([np.abs(a - b).mean() for a, b in zip(styled, plain, strict=True)]) > 2.0
    assert len(_scores(run_dir, "hits")) == 3 and len(_scores(run_dir, "leaks")) == 3


@pytest.mark.xfail(strict=True, reason="a LoRA of this size does not yet draw a new shape for its trigger alone "
                   "(see docs/mini-flux.md, LoRA acquisition)")
def test_the_trigger_word_draws_the_bowtie_and_ordinary_prompts_do_not(run):
    _, run_dir = run
    hits = [s["shape"] for s in _scores(run_dir, "hits")]
    leaks = [s["shape"] for s in _scores(run_dir, "leaks")]
    assert sum(hits) / len(hits) >= 0.8
    assert sum(leaks) / len(leaks) <= 0.1  # the leaks node reads "star" as "bowtie"


def test_the_acquisition_measurement_takes_recipe_overrides_and_names_a_wrong_key(capsys):
    """``concept measure --set`` reaches the recipe: a misspelt key fails before any training, naming it."""
    from fluxkiln.plugins.miniflux import concept

    with pytest.raises(SystemExit) as exc:
        concept.main(["measure", "--set", "nodes.lora.batch_sizes=4"])
    assert "batch_sizes" in str(exc.value) and "lora" in str(exc.value)
    assert concept.training_captions()[0].count(concept.TRIGGER) == 1


def test_an_installed_copy_finds_the_recipes_in_the_repository_it_runs_from(tmp_path, monkeypatch):
    """A non-editable install (the GPU machine's) carries no recipes: the tool uses the current folder's, and says
    where to run it when there are none."""
    from fluxkiln.plugins.miniflux import concept

    monkeypatch.setattr(concept, "__file__", str(tmp_path / "site" / "fluxkiln" / "plugins" / "miniflux" / "c.py"))
    monkeypatch.chdir(ROOT)
    assert concept.repo_root() == ROOT
    assert len(concept.training_captions()) == 8
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run the concept tool from the fluxkiln repository"):
        concept.repo_root()
