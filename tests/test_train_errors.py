"""train_lora failures a user can cause, each a clear message; layer selection; a pretrained LoRA."""

from __future__ import annotations

import pytest
import torch
from test_train_support import checkpoints, failure, load_weights, losses, run, solid_dataset, write_recipe

from fluxkiln.engine.errors import RecipeInvalid
from fluxkiln.engine.runner import Engine


@pytest.fixture
def data(tmp_path):
    return solid_dataset(tmp_path / "data")


def test_non_finite_loss_stops_training_naming_the_step(tmp_path, data):
    recipe = write_recipe(tmp_path / "r.toml", data, steps=10, save_every=1, learning_rate=1e20, max_grad_norm=0.0)
    cache = tmp_path / "cache"
    err = failure(run(recipe, cache, tmp_path / "out"))
    assert "the loss became" in err["error"] and "at step" in err["error"], err
    bad_step = int(err["error"].split("at step ")[1].split(";")[0])
    assert 1 < bad_step <= 10 and "lower learning_rate" in err["hint"]
    written = [int(p.name.split("-")[1]) for p in checkpoints(cache)]
    assert written and max(written) < bad_step
    for p in checkpoints(cache):
        assert all(bool(torch.isfinite(t).all()) for t in load_weights(p / "weights.safetensors").values())


def test_layers_regex_matching_nothing_is_an_error(tmp_path, data):
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3, layers_to_optimize_regex="no_such_layer")
    err = failure(run(recipe, tmp_path / "cache", tmp_path / "out"))
    assert "'no_such_layer' matches none of the 26 trainable layers" in err["error"]
    assert err["key"] == "layers_to_optimize_regex" and "transformer.transformer_blocks.0" in err["hint"]

    recipe = write_recipe(tmp_path / "r2.toml", data, steps=3, layers_to_optimize_regex="proj_out(")
    err = failure(run(recipe, tmp_path / "cache", tmp_path / "out"))
    assert "not a valid regular expression" in err["error"]


def test_layers_regex_selects_the_trained_layers(tmp_path, data):
    regex = r"transformer\.single_transformer_blocks\.(0|1)\.proj_out"
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3, layers_to_optimize_regex=regex)
    result = run(recipe, tmp_path / "cache", tmp_path / "out")
    assert result.ok
    keys = sorted(load_weights(result.outputs["lora"]["lora"].path))
    assert keys == [f"transformer.single_transformer_blocks.{i}.proj_out.lora_{ab}.weight"
                    for i in (0, 1) for ab in "AB"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the 8-bit optimizers can run")
@pytest.mark.parametrize("name", ["adamw8bit", "adam8bit", "lion8bit"])
def test_8bit_optimizer_on_cpu_says_to_use_adamw(tmp_path, data, name):
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3, optimizer=name)
    err = failure(run(recipe, tmp_path / "cache", tmp_path / "out"))
    assert f'optimizer = "{name}" needs an NVIDIA GPU' in err["error"] and 'optimizer = "adamw"' in err["hint"]
    assert err["key"] == "optimizer"


def test_missing_dataset_and_tiny_images(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "t"\n[nodes.base]\ntype = "load_model"\nmodel = "builtin:tiny-flux"\n'
                      '[nodes.lora]\ntype = "train_lora"\nmodel = "@base"\nsteps = 3\nresolution = [64]\n')
    err = failure(run(recipe, tmp_path / "cache", tmp_path / "out"))
    assert "needs a dataset" in err["error"] and "@data" in err["hint"]

    small = solid_dataset(tmp_path / "small", size=8)
    recipe = write_recipe(tmp_path / "r2.toml", small, steps=3)
    err = failure(run(recipe, tmp_path / "cache", tmp_path / "out"))
    assert "too small" in err["error"] and "8x8" in err["error"]


def test_parameter_ranges_are_checked_before_running(tmp_path, data):
    recipe = write_recipe(tmp_path / "r.toml", data, steps=2, lora_rank=0, resolution=[8], optimizer="adamw9bit",
                          timestep_sampling="cubic")
    with pytest.raises(RecipeInvalid) as info:
        Engine(cache_dir=tmp_path / "cache").check(recipe)
    keys = {p.key for p in info.value.problems}
    assert {"steps", "lora_rank", "resolution", "optimizer", "timestep_sampling"} <= keys

    leaky = write_recipe(tmp_path / "r2.toml", data, hf_token="hf_literal_token_in_recipe")
    with pytest.raises(RecipeInvalid) as info:
        Engine(cache_dir=tmp_path / "cache").check(leaky)
    assert any(p.key == "hf_token" and "must not be written" in p.message for p in info.value.problems)


def test_use_pretrained_lora_skips_training(tmp_path, data):
    trained = run(write_recipe(tmp_path / "r.toml", data, steps=3, export_formats=["comfyui"]),
                  tmp_path / "cache", tmp_path / "out")
    assert trained.ok
    lora = trained.outputs["lora"]["lora"]
    original = load_weights(lora.path)
    for source in (lora.path, lora.extra_files["comfyui"]):  # diffusers keys, then kohya/ComfyUI keys
        recipe = write_recipe(tmp_path / "p.toml", data, steps=3, use_pretrained_lora=str(source))
        result = run(recipe, tmp_path / "cache-p", tmp_path / "out-p")
        assert result.ok and losses(result) == []
        got = load_weights(result.outputs["lora"]["lora"].path)
        assert sorted(got) == sorted(original)
        for module in {k.rsplit(".lora_", 1)[0] for k in original}:
            delta = original[module + ".lora_B.weight"] @ original[module + ".lora_A.weight"]
            delta2 = got[module + ".lora_B.weight"] @ got[module + ".lora_A.weight"]
            assert torch.allclose(delta, delta2, atol=1e-5)


def test_cuda_out_of_memory_suggests_settings_that_fit(tmp_path, data, monkeypatch):
    from fluxkiln.plugins.train import loop

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "flow_loss", oom)
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3, resolution=[64, 1024], lora_rank=32)
    err = failure(run(recipe, tmp_path / "cache", tmp_path / "out"))
    assert "ran out of memory" in err["error"]
    for tip in ("gradient_checkpointing = true", "resolution = [512]", 'quantize = "fp8"', "lora_rank = 16",
                'optimizer = "adamw8bit"'):
        assert tip in err["hint"], tip


@pytest.mark.parametrize("name", ["adamw", "adam", "lion", "prodigy", "adafactor", "adagrad", "sgd"])
def test_every_cpu_optimizer_trains(tmp_path, data, name):
    lr = 1.0 if name == "prodigy" else 1e-3
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3, optimizer=name, learning_rate=lr)
    result = run(recipe, tmp_path / "cache", tmp_path / "out")
    assert result.ok, failure(result)
    assert len(losses(result)) == 3 and all(torch.isfinite(torch.tensor(losses(result))))


def test_out_of_memory_frees_training_state_before_parked_encoders_return(tmp_path, data, monkeypatch):
    from fluxkiln.plugins.train import gpu, loop

    order: list[str] = []

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    real_free = loop.Trainer._free
    monkeypatch.setattr(loop, "flow_loss", oom)
    monkeypatch.setattr(gpu, "parkable", lambda *a: ["vae"])  # as on a GPU with cached latents
    monkeypatch.setattr(gpu, "_move", lambda pipe, names, device: order.append(f"move {names}"))
    monkeypatch.setattr(loop.Trainer, "_free", lambda self: (order.append("free"), real_free(self)))
    err = failure(run(write_recipe(tmp_path / "r.toml", data, steps=3), tmp_path / "cache", tmp_path / "out"))
    assert "ran out of memory" in err["error"]
    assert order == ["move ['vae']", "free", "move ['vae']"]  # parked, freed, brought back
