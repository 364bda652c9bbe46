"""train_lora's differential output preservation (``preservation_class``): on mini-flux, whose text encoders
read words, prompts naming the class instead of the trigger keep the base model's prediction while the trigger
still learns; and its bad settings fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_support import failure, run, solid_dataset, write_recipe

ROOT = Path(__file__).resolve().parent.parent
HEXAGONS = ROOT / "recipes" / "data" / "hexagons"
RECIPE = """[recipe]
name = "preservation"

[nodes.base]
type = "load_model"
model = "builtin:mini-flux"

[nodes.data]
type = "dataset"
source = "{data}"

[nodes.lora]
type = "train_lora"
model = "@base"
dataset = "@data"
steps = 60
learning_rate = 3e-3
batch_size = 4
timestep_sampling = "shift"
ema = false
caption_dropout_rate = 0.0
resolution = [64]
lora_rank = 8
optimizer = "adamw"
max_sequence_length = 64
save_every = 0
export_formats = ["diffusers"]
save_dtype = "float32"
{extra}
"""


def _trained(tmp_path: Path, name: str, extra: str = "") -> Path:
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(RECIPE.format(data=HEXAGONS, extra=extra))
    result = run(recipe, tmp_path / f"cache-{name}", tmp_path / f"run-{name}")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    return Path(result.outputs["lora"]["lora"].path)


def _velocity_change(lora: Path, captions: list[str]) -> float:
    """Mean absolute change the LoRA makes to mini-flux's velocity for ``captions`` (fixed latents, noise, times)."""
    from fluxkiln.plugins.miniflux.weights import load_pipeline
    from fluxkiln.plugins.train.flow import _velocity

    pipe = load_pipeline("dev")
    gen = torch.Generator().manual_seed(0)
    shape = (len(captions), pipe.transformer.config.in_channels // 4, 16, 16)
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.linspace(0.3, 0.9, len(captions))
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(captions, captions, max_sequence_length=64)
        base = _velocity(pipe.transformer, x0, noise, t, embeds, pooled, "cpu", torch.float32)
        pipe.load_lora_weights(str(lora))
        adapted = _velocity(pipe.transformer, x0, noise, t, embeds, pooled, "cpu", torch.float32)
    return float((adapted - base).abs().mean())


@pytest.mark.usefixtures("one_torch_thread")
def test_the_class_prompt_keeps_the_base_prediction_and_the_trigger_still_learns(tmp_path):
    captions = [p.read_text().strip() for p in sorted(HEXAGONS.glob("*.txt"))[:4]]
    with_trigger = [c.replace("[trigger]", "TOK") for c in captions]
    with_class = [c.replace("[trigger]", "circle") for c in captions]
    plain, kept = _trained(tmp_path, "plain"), _trained(tmp_path, "kept", 'preservation_class = "circle"')
    drift = {name: _velocity_change(path, with_class) for name, path in (("plain", plain), ("kept", kept))}
    learnt = {name: _velocity_change(path, with_trigger) for name, path in (("plain", plain), ("kept", kept))}
    # 2026-11-30, this CPU: drift 0.506 -> 0.313, learnt 0.485 -> 0.458
    assert drift["kept"] < 0.7 * drift["plain"], (drift, learnt)  # circles are left more alone
    assert learnt["kept"] > 0.6 * learnt["plain"], (drift, learnt)  # while the trigger still learns
    ratio = {name: learnt[name] / drift[name] for name in drift}  # plain: the change reaches circles as much
    assert ratio["kept"] > 1.3 * ratio["plain"], (drift, learnt)  # kept: it goes to the trigger


def test_the_class_word_replaces_the_whole_trigger_word_only():
    from fluxkiln.plugins.train.config import TrainConfig

    cfg = TrainConfig(trigger_word="TOK", preservation_class="person")
    assert cfg.preservation_classes == ["person"]
    assert cfg.preserved("a photo of TOK at night", "person") == "a photo of person at night"
    assert cfg.preserved("TOKEN TOK, TOK", "person") == "TOKEN person, person"
    assert cfg.preserved("no trigger", "person") == "no trigger"
    assert TrainConfig(preservation_class=["circle", "star"]).preservation_classes == ["circle", "star"]
    assert TrainConfig().preservation_classes == []


@pytest.mark.parametrize(("train", "key", "words"), [
    ({"preservation_class": "dog", "trigger_word": ""}, "preservation_class", "trigger_word is empty"),
    ({"preservation_class": "TOK"}, "preservation_class", "the trigger word itself"),
    ({"preservation_weight": 2.0}, "preservation_weight", "preservation_class is not"),
    ({"preservation_every": 4}, "preservation_every", "preservation_class is not"),
    ({"preservation_class": ["dog", "TOK"]}, "preservation_class", "the trigger word itself"),
])
def test_bad_preservation_settings_fail_the_node_naming_the_key(tmp_path, train, key, words):
    data = solid_dataset(tmp_path / "data")
    info = failure(run(write_recipe(tmp_path / "r.toml", data, steps=3, **train), tmp_path / "cache",
                       tmp_path / "run"))
    assert info["key"] == key and words in info["error"] and info.get("hint"), info


@pytest.mark.parametrize(("every", "steps_with_the_term"), [(1, [1, 2, 3, 4, 5, 6]), (3, [3, 6]), (4, [4])])
def test_preservation_every_n_th_step_adds_the_term_on_those_steps_only(tmp_path, monkeypatch, every,
                                                                        steps_with_the_term):
    from fluxkiln.plugins.train import loop

    entered, seen = [], []
    step, term = loop.Trainer._step, loop.preservation_loss

    def stepping(self, pipe, n):
        entered.append(n)
        return step(self, pipe, n)

    def counted(*args, **kwargs):
        seen.append(entered[-1])  # the step the term is computed in
        return term(*args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "_step", stepping)
    monkeypatch.setattr(loop, "preservation_loss", counted)
    data = solid_dataset(tmp_path / "data")
    result = run(write_recipe(tmp_path / "r.toml", data, steps=6, preservation_class="dog", preservation_every=every),
                 tmp_path / "cache", tmp_path / "run")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    assert entered == [1, 2, 3, 4, 5, 6] and seen == steps_with_the_term, (entered, seen)


def test_a_list_of_class_words_draws_one_for_each_image_of_each_preservation_step(tmp_path, monkeypatch):
    from fluxkiln.plugins.train import data as train_data

    batches = []
    batch = train_data.TextStore.batch

    def recorded(self, texts):
        batches.append(list(texts))
        return batch(self, texts)

    monkeypatch.setattr(train_data.TextStore, "batch", recorded)
    data = solid_dataset(tmp_path / "data", n=4)
    words = ["dog", "cat", "bird"]
    result = run(write_recipe(tmp_path / "r.toml", data, steps=8, batch_size=4, caption_dropout_rate=0.0,
                              preservation_class=words), tmp_path / "cache", tmp_path / "run")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    kept = [b for b in batches if all("TOK" not in c for c in b)]  # the preservation term's captions
    assert len(kept) == 8 and all(len(b) == 4 for b in kept), batches
    drawn = [c.removeprefix("a photo of ") for b in kept for c in b]
    assert set(drawn) == set(words), drawn  # every word is drawn, and only those
    assert len({tuple(b) for b in kept}) > 1  # drawn afresh each step


def test_a_class_word_listed_twice_is_drawn_about_twice_as_often(tmp_path, monkeypatch):
    from fluxkiln.plugins.train import data as train_data

    batches = []
    batch = train_data.TextStore.batch
    monkeypatch.setattr(train_data.TextStore, "batch", lambda self, texts: batches.append(list(texts)) or
                        batch(self, texts))
    data = solid_dataset(tmp_path / "data", n=4)
    result = run(write_recipe(tmp_path / "r.toml", data, steps=24, batch_size=4, caption_dropout_rate=0.0,
                              preservation_class=["dog", "dog", "cat"]), tmp_path / "cache", tmp_path / "run")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    drawn = [c.removeprefix("a photo of ") for b in batches if all("TOK" not in c for c in b) for c in b]
    assert len(drawn) == 96 and set(drawn) == {"dog", "cat"}
    assert 1.5 < drawn.count("dog") / drawn.count("cat") < 2.7, (drawn.count("dog"), drawn.count("cat"))


@pytest.mark.parametrize("bad", ["[]", '["dog", ""]'])
def test_an_empty_list_or_word_of_class_words_is_refused_before_the_run(tmp_path, bad):
    from fluxkiln.engine.errors import RecipeInvalid

    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3)
    recipe.write_text(recipe.read_text() + f"preservation_class = {bad}\n")
    with pytest.raises(RecipeInvalid) as info:
        run(recipe, tmp_path / "cache", tmp_path / "run")
    assert any(p.key == "preservation_class" for p in info.value.problems), info.value.problems


def test_a_weight_of_zero_is_refused_before_the_run(tmp_path):
    from fluxkiln.engine.errors import RecipeInvalid

    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3, preservation_class="dog", preservation_weight=0.0)
    with pytest.raises(RecipeInvalid) as info:
        run(recipe, tmp_path / "cache", tmp_path / "run")
    assert any(p.key == "preservation_weight" and "greater than 0" in p.message for p in info.value.problems)


def _adapted_tiny(device: str = "cpu"):
    """The tiny transformer with the training adapter attached and its B matrices moved off zero."""
    from diffusers import FluxPipeline

    from fluxkiln.plugins.flux.tiny import tiny_flux_path
    from fluxkiln.plugins.train import adapter

    pipe = FluxPipeline.from_pretrained(tiny_flux_path()).to(device)
    named = adapter.attach(pipe, adapter.select_layers(pipe.transformer, None), 4, 4.0, 0)
    with torch.no_grad():
        for name, p in named.items():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator(device).manual_seed(1))
    return pipe


def _inputs(pipe, n: int = 2):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(n, pipe.transformer.config.in_channels // 4, 8, 8, generator=gen)
    embeds, pooled, _ = pipe.encode_prompt(["a photo of dog"] * n, ["a photo of dog"] * n, max_sequence_length=16,
                                           device=pipe.device)
    return latents, embeds.cpu(), pooled.cpu()


def test_the_term_over_the_ranks_shares_is_the_whole_batch_s_and_an_empty_share_draws_alike():
    from fluxkiln.plugins.train.flow import preservation_loss

    pipe = _adapted_tiny()
    latents, embeds, pooled = _inputs(pipe)

    def term(part):
        gen = torch.Generator().manual_seed(3)
        value = preservation_loss(pipe.transformer, latents, embeds, pooled, gen, "sigmoid", "cpu", torch.float32,
                                  part=part)
        return value, torch.randn(1, generator=gen)  # what the generator gives next: in step on every rank

    whole, after = term(None)
    first, after_first = term(range(0, 1))
    second, after_second = term(range(1, 2))
    empty, after_empty = term(range(1, 1))
    assert whole.item() > 0 and torch.allclose((first + second) / 2, whole, rtol=1e-5)
    assert empty is None and torch.equal(after, after_first) and torch.equal(after, after_second)
    assert torch.equal(after, after_empty)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_blocks_see_the_adapter_switched_off_for_the_base_prediction():
    from fluxkiln.plugins.flux import fast
    from fluxkiln.plugins.train.flow import preservation_loss

    pipe = _adapted_tiny("cuda")
    latents, embeds, pooled = _inputs(pipe)
    fast.compile_blocks(pipe.transformer, saved=False)  # as train_lora compiles them on a GPU
    eager = _adapted_tiny("cuda")
    values = [preservation_loss(p.transformer, latents, embeds, pooled, torch.Generator().manual_seed(3), "sigmoid",
                                "cuda", torch.float32).item() for p in (pipe, eager)]
    assert values[0] > 0 and abs(values[0] - values[1]) <= 1e-3 * values[1], values  # 0 if the switch were baked in
