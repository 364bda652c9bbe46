"""bench/lora_blocks.py, the block-weight reading behind docs/mini-flux.md's "Where the word lives": its rules
weigh exactly the layers they name, a LoRA weighed to nothing samples as the base does, and a second call reuses
the LoRA it trained."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = ROOT / "plugins" / "miniflux" / "weights" / "mini-flux"


@pytest.fixture(scope="module")
def blocks():
    spec = importlib.util.spec_from_file_location("lora_blocks", ROOT / "bench" / "lora_blocks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_blocks"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_first_rule_that_a_layer_name_contains_gives_its_weight(blocks):
    weight = blocks.layer_weights(r"single_transformer_blocks\.[4-7]\.=0,single=0.5,*=2")
    assert weight("single_transformer_blocks.5.proj_mlp") == 0
    assert weight("single_transformer_blocks.3.proj_mlp") == 0.5
    assert weight("transformer_blocks.0.attn.to_q") == 2
    assert blocks.layer_weights("single=0.5")("transformer_blocks.0.ff.net.2") == 1
    assert blocks.layer_weights("all")("anything") == 1
    assert weight.unused(["single_transformer_blocks.0.proj_mlp"]) == [r"single_transformer_blocks\.[4-7]\."]


def test_a_timestep_after_the_rules_sets_from_when_the_lora_acts(blocks):
    assert blocks.layer_weights("all@0.5") == blocks.Weights(above=0.5)
    weight = blocks.layer_weights("single=0,*=2@0.25")
    assert (weight.above, weight("single_transformer_blocks.0.proj_out"), weight("transformer_blocks.0.ff")) == (
        0.25, 0, 2)
    assert blocks.layer_weights("all").above == 0
    for spec in ("all@x", "all@1.5", "single=0@-0.1", "foo@bar=0"):
        with pytest.raises(ValueError, match="not a timestep from 0 to 1.*a pattern cannot hold '@'"):
            blocks.layer_weights(spec)
    half = blocks.layer_weights("all@0.5")
    assert (half.acts_at(1.0), half.acts_at(0.5), half.acts_at(0.4999)) == (True, True, False)
    assert blocks.layer_weights("all").acts_at(0.0)


def test_weigh_sets_each_layers_scaling_to_its_trained_value_times_its_weight(blocks):
    class Layer:
        def __init__(self):
            self.scaling = {"concept": 0.0}

    layers = {"single_transformer_blocks.5.proj_mlp": Layer(), "transformer_blocks.0.attn.to_q": Layer()}
    trained = {"single_transformer_blocks.5.proj_mlp": 2.0, "transformer_blocks.0.attn.to_q": 0.5}
    off = blocks.weigh(layers, trained, blocks.layer_weights("single=0,*=3"))
    assert off == ["single_transformer_blocks.5.proj_mlp"]
    assert layers["single_transformer_blocks.5.proj_mlp"].scaling["concept"] == 0
    assert layers["transformer_blocks.0.attn.to_q"].scaling["concept"] == 1.5
    blocks.weigh(layers, trained, blocks.layer_weights("all"))
    assert [layer.scaling["concept"] for layer in layers.values()] == [2.0, 0.5]


@pytest.mark.parametrize("spec", ["single", "=0", "single=x", "(=0", "all@2"])
def test_a_bad_rule_is_refused_before_any_work(blocks, spec, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        blocks.main(["--model", str(WEIGHTS), "--work", str(tmp_path), spec])
    assert exc.value.code == 2 and "weights" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_setting_the_recipe_refuses_is_reported_with_its_line(blocks, tmp_path):
    with pytest.raises(SystemExit) as exc:
        blocks.main(["--model", str(WEIGHTS), "--work", str(tmp_path), "--set", "nodes.lora.steps=2", "all"])
    assert "not valid" in str(exc.value) and "train-lora-tiny.toml" in str(exc.value) and "'steps'" in str(exc.value)


def test_a_folder_that_is_not_a_pipeline_is_refused(blocks, tmp_path, capsys):
    with pytest.raises(SystemExit):
        blocks.main(["--model", str(tmp_path), "all"])
    assert "not a pipeline folder" in capsys.readouterr().err


def test_rows_weigh_the_named_layers_and_a_lora_weighed_to_nothing_is_the_base(blocks, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.chdir(ROOT)  # a --model relative to where the command runs, not to the recipe
    args = ["--model", str(WEIGHTS.relative_to(ROOT)), "--work", str(tmp_path / "work"), "--set", "nodes.lora.steps=4",
            "--set", "nodes.lora.save_every=0", "--set", "nodes.lora.sample_every=0", "--prompts", "2",
            "--vocab", "3", "--steps", "2", "--json", str(tmp_path / "rows.json"),
            "all@1", "all", r"single_transformer_blocks\.[4-7]\.=0", "*=0"]
    assert blocks.main(args) == 0
    assert "trained in" in capsys.readouterr().out
    rows = {r["weights"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert rows["all"]["layers_off"] == []
    off = rows[r"single_transformer_blocks\.[4-7]\.=0"]["layers_off"]
    assert off and {name.split(".")[1] for name in off} == {"4", "5", "6", "7"}
    assert all(name.startswith("single_transformer_blocks.") for name in off)
    nothing = rows["*=0"]
    assert nothing["vocabulary_change"] == 0 and nothing["cost"] == 0
    assert nothing["vocabulary_after"] == nothing["vocabulary_before"]
    assert rows["all"]["vocabulary_change"] > 0  # the trained LoRA moves pixels: weighed to nothing, none
    cut = rows[r"single_transformer_blocks\.[4-7]\.=0"]["vocabulary_change"]
    assert cut > 0 and cut != rows["all"]["vocabulary_change"]
    assert len(nothing["layers_off"]) > len(off)
    assert (rows["all@1"]["steps_on"], rows["all@1"]["timesteps_on"], rows["all@1"]["steps"]) == (1, [1.0], 2)
    assert rows["all"]["steps_on"] == rows["all"]["steps"] == 2
    first_step = rows["all@1"]["vocabulary_change"]  # the LoRA at the first, noisiest step only, then off
    assert 0 < first_step != rows["all"]["vocabulary_change"]  # and "all", read after it, acts at every step again
    assert blocks.main(args[:-4] + ["all"]) == 0  # the same settings: the kept LoRA, no training
    assert "trained in" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # checked against the kept LoRA's layers before any sampling
        blocks.main(args[:-4] + [r"single_transformer_blocks\.[4-7]\.=0,single_blocks=0"])
    assert "'single_blocks'" in str(exc.value) and "match none of the LoRA's layers" in str(exc.value)
    assert blocks.main(args[:-4] + ["--seed", "7", "all"]) == 0  # another seed: another LoRA
    assert "trained in" in capsys.readouterr().out
