"""bench/concept_probe.py, the in-process LoRA experiment behind docs/mini-flux.md's acquisition table: it runs
end to end with its options, and the pieces it varies (the prior set, the trained weights) are what it says."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import ROOT
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def probe():
    return _load("concept_probe")


@pytest.fixture(scope="module")
def trainer(probe):
    import sys

    return sys.modules["concept_train"]  # the module concept_probe trains with (its own import)


def test_a_short_run_with_a_prior_set_and_text_encoder_loras_writes_every_row_and_the_grid(probe, tmp_path, capsys):
    out, grid = tmp_path / "probe.json", tmp_path / "grid.png"
    assert probe.main(["--steps", "4", "--batch", "2", "--prior", "4", "--text-encoders", "--probe", "1",
                       "--sample-steps", "2", "--json", str(out), "--grid", str(grid)]) == 0
    result = json.loads(out.read_text())
    rows = ["training captions, guidance 1", "training captions, guidance 3", "new prompts with the trigger",
            "the same with a known shape (leakage)"]
    assert all(0 <= result[r] <= 100 for r in rows) and result["train_seconds"] > 0
    assert result["settings"]["prior"] == 4 and result["settings"]["text_encoders"] and result["last_100_loss"] > 0
    assert Image.open(grid).size == (8 * 128, 5 * 128)  # the 8 training images over four rows of samples
    assert "| new prompts with the trigger |" in capsys.readouterr().out


def test_the_prior_set_holds_every_known_shape_with_its_own_caption(probe):
    from fluxkiln.plugins.miniflux.checker import check
    from fluxkiln.plugins.miniflux.world import SHAPES

    images, captions = probe.prior_set(8)
    assert len(images) == len(captions) == 8
    assert sorted(next(s for s in SHAPES if s in c) for c in captions) == sorted(SHAPES * 2)
    assert all(check(im, c).scores["shape"] == 1 for im, c in zip(images, captions, strict=True))


@pytest.mark.parametrize("full", [False, True])
def test_the_trained_weights_are_a_lora_or_every_block_weight(trainer, full):
    from fluxkiln.plugins.miniflux.weights import load_pipeline

    transformer = load_pipeline("dev").transformer
    params = {id(p) for p in trainer.trainable(transformer, 4, full)}
    named = {n: p for n, p in transformer.named_parameters()}
    training = {n for n, p in named.items() if id(p) in params}
    assert training == {n for n, p in named.items() if p.requires_grad}
    if full:
        assert training == {n for n in named if n.startswith(("transformer_blocks", "single_transformer_blocks"))}
    else:
        assert training and all(".lora_A." in n or ".lora_B." in n for n in training)


def test_the_text_encoders_train_only_their_lora_layers_and_the_captions_reach_them(trainer):
    import torch

    from fluxkiln.plugins.miniflux.weights import load_pipeline

    pipe = load_pipeline("dev")
    params = {id(p) for p in trainer.text_trainable(pipe, 4)}
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        training = {n for n, p in encoder.named_parameters() if id(p) in params}
        assert training == {n for n, p in encoder.named_parameters() if p.requires_grad}
        assert training and all(".lora_A." in n or ".lora_B." in n for n in training)
    embeds, pooled, _ = pipe.encode_prompt(["a red TOK"], ["a red TOK"], max_sequence_length=32)
    (embeds.sum() + pooled.sum()).backward()  # a graph to both encoders' LoRAs (B starts at zero: B gets a gradient)
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    grads = [p.grad for e in encoders for n, p in e.named_parameters() if ".lora_B." in n]
    assert all(g is not None for g in grads) and any(torch.count_nonzero(g) for g in grads)


def test_only_the_triggers_own_embeddings_train_and_the_prior_comes_every_kth_step(probe, trainer, tmp_path):
    import torch

    from fluxkiln.plugins.miniflux.concept import TRIGGER
    from fluxkiln.plugins.miniflux.weights import load_pipeline

    pipe = load_pipeline("dev")
    tables = trainer.embedding_trainable(pipe, TRIGGER)
    before = [t.detach().clone() for t in tables]
    captions = [f"a red {TRIGGER} on a blue background", "a red circle on a blue background"]
    embeds, pooled, _ = pipe.encode_prompt(captions, captions, max_sequence_length=pipe.tokenizer_2.model_max_length)
    (embeds.square().mean() + pooled.square().mean()).backward()
    torch.optim.SGD(tables, lr=1.0).step()
    for table, old, tokenizer in zip(tables, before, (pipe.tokenizer, pipe.tokenizer_2), strict=True):
        ids = set(tokenizer(TRIGGER, add_special_tokens=False)["input_ids"])
        changed = {i for i in range(table.shape[0]) if not torch.equal(table[i], old[i])}
        assert changed == ids  # the trigger's rows, and only those
    out = tmp_path / "p.json"
    assert probe.main(["--steps", "4", "--batch", "1", "--prior", "4", "--prior-every", "3", "--embeddings",
                       "--probe", "1", "--sample-steps", "1", "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["prior_every"] == 3 and settings["embeddings"]
    assert [trainer.is_prior_step(s, 3) for s in range(6)] == [False, False, True, False, False, True]
    assert [trainer.is_prior_step(s, 2) for s in range(4)] == [False, True, False, True]  # every other step
    with pytest.raises(SystemExit):
        probe.main(["--prior-every", "1"])


def test_caption_variants_leave_out_every_subset_of_the_optional_parts_and_keep_the_trigger(trainer):
    variants = trainer.caption_variants("a large red TOK at the top left on a blue background")
    assert len(variants) == len(set(variants)) == 16
    assert variants[0] == "a large red TOK at the top left on a blue background" and variants[-1] == "a TOK"
    assert "a red TOK on a blue background" in variants and "a large TOK at the top left" in variants
    assert all("TOK" in v and "  " not in v for v in variants)
    assert trainer.caption_variants("a small TOK in the center") == ["a small TOK in the center", "a small TOK",
                                                                    "a TOK in the center", "a TOK"]


def test_the_same_scenes_prior_draws_the_training_images_scenes_with_each_known_shape(probe):
    import numpy as np

    from fluxkiln.plugins.miniflux.checker import check
    from fluxkiln.plugins.miniflux.concept import training_captions
    from fluxkiln.plugins.miniflux.world import SHAPES

    trained = training_captions()
    images, captions = probe.prior_set(32, same_scenes=trained)
    for k, shape in enumerate(SHAPES):
        assert captions[8 * k:8 * k + 8] == [c.replace("TOK", shape) for c in trained]
    assert all(check(im, c).scores["shape"] == 1 for im, c in zip(images, captions, strict=True))
    dataset = sorted((ROOT / "recipes" / "data" / "hexagons").glob("*.png"))
    # the same background and the same object colour as the training image of that scene
    for im, path in zip(images[:8], dataset, strict=True):
        a, b = np.asarray(im.convert("RGB")), np.asarray(Image.open(path).convert("RGB"))
        assert (a[0, 0] == b[0, 0]).all()


def test_the_layers_option_trains_only_the_matching_loras_and_names_a_regex_that_matches_none(trainer):
    from fluxkiln.plugins.miniflux.weights import load_pipeline

    transformer = load_pipeline("dev").transformer
    trainer.trainable(transformer, 4, False, r"transformer_blocks\.\d+\.attn\.add_k_proj")
    training = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert training and all(".attn.add_k_proj.lora_" in n for n in training)
    with pytest.raises(ValueError, match="matches none"):
        trainer.trainable(load_pipeline("dev").transformer, 4, False, "no_such_layer")


def test_loraplus_trains_the_b_matrices_at_r_times_the_rate_and_the_rest_at_the_rate(probe, trainer):
    from fluxkiln.plugins.miniflux.weights import load_pipeline

    transformer = load_pipeline("dev").transformer
    params = trainer.trainable(transformer, 4, False, r"single_transformer_blocks\.0\.")
    names = {id(p): n for n, p in transformer.named_parameters()}
    assert trainer.rate_groups(transformer, params, 1e-3) == [{"params": params, "lr": 1e-3}]
    a, b = trainer.rate_groups(transformer, params, 1e-3, 8.0)
    assert a["lr"] == 1e-3 and b["lr"] == 8e-3 and len(a["params"]) == len(b["params"]) > 0
    assert all(".lora_A." in names[id(p)] for p in a["params"]) and all(".lora_B." in names[id(p)] for p in b["params"])
    assert probe.make_parser().parse_args(["--loraplus", "4"]).loraplus == 4.0
    for wrong in (["--loraplus", "0"], ["--loraplus", "4", "--full"], ["--loraplus", "4", "--rank", "0"]):
        with pytest.raises(SystemExit):
            probe.main(wrong)


def test_a_sweep_runs_each_setting_and_a_broken_one_does_not_stop_the_rest(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("concept_sweep", ROOT / "bench" / "concept_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    assert sweep.main(["--out", str(tmp_path), "--device", "cpu", "--probe", "1",
                       "--steps 2 --batch 2 --sample-steps 1 --caption-variants --prior 8 --prior-scenes same",
                       "--steps 2 --layers no_such_layer"]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["setting"].split()[1] for r in rows] == ["2", "2"]
    assert rows[0]["settings"]["caption_variants"] and rows[0]["settings"]["prior_scenes"] == "same"
    assert 0 <= rows[0]["new prompts with the trigger"] <= 100
    assert "matches none" in rows[1]["error"]
    assert "| --steps 2 --layers no_such_layer |" in capsys.readouterr().out


def test_a_new_trigger_token_is_one_t5_token_that_starts_as_the_shape_words_mean(trainer):
    import torch

    from fluxkiln.plugins.miniflux.weights import load_pipeline
    from fluxkiln.plugins.miniflux.world import SHAPES

    pipe = load_pipeline("dev")
    before = pipe.tokenizer_2.tokenize("a red TOK on a blue background")
    new = trainer.add_trigger_token(pipe, "TOK")
    assert len(before) > len(pipe.tokenizer_2.tokenize("a red TOK on a blue background"))  # letters -> one token
    assert pipe.tokenizer_2("TOK", add_special_tokens=False)["input_ids"] == [new]
    table = pipe.text_encoder_2.get_input_embeddings().weight
    shapes = [pipe.tokenizer_2(s, add_special_tokens=False)["input_ids"][0] for s in SHAPES]
    assert torch.allclose(table[new], table[shapes].mean(0))
    assert [t.shape[0] for t in trainer.embedding_trainable(pipe, "TOK")][1] == len(pipe.tokenizer_2)
    assert [t.shape[0] for t in trainer.embedding_trainable(pipe, "TOK", clip=False)] == [len(pipe.tokenizer_2)]
    with pytest.raises(ValueError, match="one T5 token"):
        trainer.add_trigger_token(load_pipeline("dev"), "TOK", init="hexagon")


def test_more_guidance_adds_rows_for_the_new_prompts_and_the_leakage(probe, tmp_path):
    out, grid = tmp_path / "p.json", tmp_path / "g.png"
    assert probe.main(["--steps", "1", "--batch", "1", "--probe", "1", "--sample-steps", "1", "--more-guidance", "5",
                       "--json", str(out), "--grid", str(grid)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["new prompts with the trigger, guidance 5"] <= 100 and 0 <= result["leakage, guidance 5"] <= 100
    assert Image.open(grid).size == (8 * 128, 7 * 128)  # two more rows of samples


def test_augmented_images_are_mirrored_and_recoloured_with_captions_the_checker_confirms(probe):
    from fluxkiln.plugins.miniflux.checker import check
    from fluxkiln.plugins.miniflux.concept import CONCEPT, TRIGGER, training_captions

    folder = ROOT / "recipes" / "data" / "hexagons"
    images = [Image.open(p) for p in sorted(folder.glob("*.png"))]
    captions = training_captions()
    out_images, out_captions = probe.augmented_set(images, captions, 2)
    assert len(out_images) == len(out_captions) == 24 and out_captions[:8] == captions  # the originals first
    new = out_captions[8:]
    assert len(set(new) - set(captions)) >= 12  # new colour, background and place combinations
    for image, caption in zip(out_images, out_captions, strict=True):  # every caption says what its image shows
        assert check(image, caption.replace(TRIGGER, CONCEPT)).all_right, caption
    with pytest.raises(ValueError, match="names no object and background colour"):
        probe.augment(images[0], "a TOK", __import__("random").Random(0))


def test_a_class_word_follows_the_trigger_in_every_caption_trained_and_prompt_sampled(probe, tmp_path, monkeypatch):
    from fluxkiln.plugins.miniflux import adherence

    trained, sampled = [], []
    real_train, real_generate = probe.train, adherence.generate
    monkeypatch.setattr(probe, "train", lambda pipe, data, captions, n, args, *notes: trained.extend(captions[:n])
                        or real_train(pipe, data, captions, n, args, *notes))
    monkeypatch.setattr(adherence, "generate", lambda pipe, prompts, **kw: sampled.append(prompts)
                        or real_generate(pipe, prompts, **kw))
    assert probe.main(["--steps", "1", "--probe", "2", "--sample-steps", "1", "--class-word", "circle",
                       "--json", str(tmp_path / "p.json")]) == 0
    assert len(trained) == 8 and all(" TOK circle " in c for c in trained)
    captions, _, new, leakage = sampled
    assert captions == trained and all(" TOK circle " in p for p in new)
    assert not any("TOK" in p for p in leakage)  # the leakage prompts name a known shape and no trigger


def test_a_balanced_dataset_spreads_the_vocabulary_and_the_probe_trains_on_the_folder_it_is_given(probe, tmp_path,
                                                                                                  monkeypatch, capsys):
    from PIL import Image

    from fluxkiln.plugins.miniflux import concept
    from fluxkiln.plugins.miniflux.checker import check
    from fluxkiln.plugins.miniflux.world import COLOURS, parse

    data = tmp_path / "balanced"
    assert concept.main(["dataset", str(data), "--balanced"]) == 0
    captions = concept.training_captions(data)
    scenes = [parse(c, {"TOK": "hexagon"}) for c in captions]
    objects = [s.objects[0] for s in scenes]
    assert sorted(o.colour for o in objects) == sorted(COLOURS) == sorted(s.background for s in scenes)
    assert all(o.colour != s.background for o, s in zip(objects, scenes, strict=True))
    assert len({o.position for o in objects}) == 8 and "center" not in {o.position for o in objects}
    assert sorted(o.size for o in objects) == ["large"] * 4 + ["small"] * 4
    for path, text in zip(sorted(data.glob("*.png")), captions, strict=True):  # each image is what it says
        assert check(Image.open(path), text, {"TOK": "hexagon"}).all_right, text
    assert captions != concept.training_captions()  # not the bundled dataset
    with pytest.raises(ValueError, match="a balanced dataset has 8 images"):
        concept.write_dataset(tmp_path / "four", n=4, balanced=True)
    assert not (tmp_path / "four").exists()

    trained = []
    real_train = probe.train
    monkeypatch.setattr(probe, "train", lambda pipe, d, caps, n, args, *notes: trained.extend(caps[:n])
                        or real_train(pipe, d, caps, n, args, *notes))
    assert probe.main(["--steps", "1", "--probe", "1", "--sample-steps", "1", "--data", str(data)]) == 0
    assert trained == captions
    (data / "concept-8.txt").unlink()  # an image without its caption
    for folder in (data, tmp_path / "empty"):
        with pytest.raises(SystemExit):
            probe.main(["--data", str(folder)])
        assert f"--data {folder}: needs .png images, each with a .txt caption" in capsys.readouterr().err


def test_lora_scales_sample_the_new_and_leakage_prompts_again_with_the_lora_scaled(probe, tmp_path, monkeypatch):
    from fluxkiln.plugins.miniflux import adherence

    seen = []
    real_generate = adherence.generate

    def generate(pipe, prompts, **kw):
        seen.append(next(m.scaling["default"] for m in pipe.transformer.modules() if hasattr(m, "scaling")))
        return real_generate(pipe, prompts, **kw)

    monkeypatch.setattr(adherence, "generate", generate)
    out = tmp_path / "p.json"
    assert probe.main(["--steps", "1", "--probe", "1", "--sample-steps", "1", "--lora-scales", "2",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["new prompts with the trigger, LoRA scale 2"] <= 100
    assert 0 <= result["leakage, LoRA scale 2"] <= 100
    assert seen == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]  # the four usual rows at the trained strength, then twice as strong
    with pytest.raises(SystemExit):
        probe.main(["--full", "--lora-scales", "2"])  # no LoRA to scale


@pytest.mark.parametrize("shape", ["cross", "diamond", "ring", "bowtie"])
def test_another_concept_s_dataset_shows_that_shape_in_the_balanced_scenes_and_the_checker_reads_it(shape, tmp_path):
    from fluxkiln.plugins.miniflux import concept
    from fluxkiln.plugins.miniflux.checker import check

    data = tmp_path / shape
    assert concept.main(["dataset", str(data), "--balanced", "--shape", shape]) == 0
    hexagons = tmp_path / "hexagons"
    concept.write_dataset(hexagons, balanced=True)
    captions = concept.training_captions(data)
    assert captions == concept.training_captions(hexagons)  # the same scenes and captions, another shape drawn
    images = [Image.open(p) for p in sorted(data.glob("*.png"))]
    for image, text in zip(images, captions, strict=True):
        read = check(image, text, {"TOK": shape})
        assert read.all_right and read.blobs[0].shape == shape, text
        assert check(image, text, {"TOK": "hexagon"}, also=(shape,)).scores["shape"] == 0  # told from the hexagon
    prompts = [c.replace("TOK", shape) for c in captions]
    assert concept.concept_share(images, prompts, shape) == 1.0
    assert concept.concept_share(images, prompts) == 0.0  # the default concept, the hexagon, is not in them
    with_trigger, without = concept.probe_prompts(4, shape=shape)
    assert all("TOK" in p and shape not in p for p in with_trigger) and not any("TOK" in p for p in without)
    with pytest.raises(SystemExit):
        concept.main(["dataset", str(tmp_path / "x"), "--shape", "circle"])  # a known shape is no new concept


def test_the_dataset_s_masks_are_white_on_the_object_and_match_the_bundled_bowties(tmp_path):
    import numpy as np

    from fluxkiln.plugins.miniflux import concept

    data, masks = tmp_path / "bowties", tmp_path / "masks"
    assert concept.main(["dataset", str(data), "--balanced", "--shape", "bowtie", "--masks", str(masks)]) == 0
    assert sorted(p.name for p in masks.iterdir()) == sorted(p.name for p in data.glob("*.png"))
    for picture in sorted(data.glob("*.png")):
        px = np.asarray(Image.open(picture).convert("RGB"), dtype=np.int16)
        mask = np.asarray(Image.open(masks / picture.name))
        background = px[0, 0]  # the corners are background in every balanced scene
        off = np.abs(px - background).max(-1) > 60
        assert mask.shape == px.shape[:2] and 0 < (mask > 127).mean() < 0.2
        assert (mask[off] > 127).mean() > 0.95 and (mask[~off] < 128).mean() > 0.99  # white where the shape is
        assert (picture.read_bytes() == (ROOT / "recipes" / "data" / "bowties" / picture.name).read_bytes())
        assert mask.tobytes() == np.asarray(Image.open(ROOT / "recipes" / "data" / "bowtie-masks" /
                                                       picture.name)).tobytes()  # the bundled ones, as written


def test_the_measure_reads_the_recipe_s_concept_data_and_scale():
    from fluxkiln.plugins.miniflux import concept

    recipe = ROOT / "recipes" / "train-lora-tiny.toml"
    read = concept.recipe_concept(recipe)
    assert read.folder.resolve() == (ROOT / "recipes" / "data" / "bowties").resolve() and read.shape == "bowtie"
    assert read.scale == 1.25 and read.model == "builtin:mini-flux"
    read = concept.recipe_concept(recipe, ["nodes.styled.lora_scale=1.0", 'nodes.base.model="elsewhere/mf"'])
    assert read.scale == 1.0 and read.model == "elsewhere/mf"  # the measure samples at the scale --set gives


def test_the_measure_refuses_settings_the_recipe_does_not_accept_with_their_line_before_any_training():
    from fluxkiln.plugins.miniflux import concept

    with pytest.raises(SystemExit) as exc:
        concept.measure(None, 1, overrides=["nodes.lora.steps=2"])
    assert "not valid" in str(exc.value) and "train-lora-tiny.toml:" in str(exc.value)
    assert "node 'lora' key 'steps'" in str(exc.value)


def test_the_measure_samples_the_folder_load_model_loaded_and_refuses_a_single_file(tmp_path):
    from types import SimpleNamespace

    from fluxkiln.plugins.miniflux import concept
    from fluxkiln.plugins.miniflux.weights import model_path

    assert concept.recipe_concept(ROOT / "recipes" / "train-lora-tiny.toml").model_node == "base"
    loaded = SimpleNamespace(ref="builtin:mini-flux", info={"path": str(model_path("dev"))})
    assert concept.loaded_folder(loaded) == model_path("dev")
    (tmp_path / "flux1-dev.safetensors").write_bytes(b"")
    single = SimpleNamespace(ref="flux1-dev.safetensors", info={"path": str(tmp_path / "flux1-dev.safetensors")})
    with pytest.raises(SystemExit, match="'flux1-dev.safetensors' loaded from .* which is not one"):
        concept.loaded_folder(single)


def test_self_distilled_preservation_is_zero_for_the_untrained_adapter_and_pulls_a_trained_one_back(trainer):
    import torch

    from fluxkiln.plugins.miniflux.concept import training_captions
    from fluxkiln.plugins.miniflux.weights import load_pipeline
    from fluxkiln.plugins.train.flow import preservation_loss  # what --preserve adds, as train_lora does

    pipe = load_pipeline("dev")
    captions = training_captions()[:2]
    images = [Image.open(p) for p in sorted((ROOT / "recipes" / "data" / "hexagons").glob("*.png"))[:2]]
    latents, *_ = trainer.encode(pipe, images, captions)
    embeds, pooled = trainer.swapped_embeddings(pipe, captions)
    assert embeds.shape[:2] == pooled.shape[:2] == (4, 2)  # each known shape word for each caption
    params = trainer.trainable(pipe.transformer, 4, False)
    first = preservation_loss(pipe.transformer, latents, embeds[0], pooled[0], torch.Generator().manual_seed(0),
                              "shift", "cpu", torch.float32)
    assert first.item() == 0.0  # LoRA B starts at zero: the adapted model is the base model
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    moved = preservation_loss(pipe.transformer, latents, embeds[0], pooled[0], torch.Generator().manual_seed(0),
                              "shift", "cpu", torch.float32)
    assert moved.item() > 1e-6 and moved.requires_grad
    moved.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_a_short_run_with_preservation_writes_its_rows(probe, tmp_path):
    out = tmp_path / "p.json"
    assert probe.main(["--steps", "2", "--batch", "2", "--preserve", "0.5", "--preserve-every", "2", "--probe", "1",
                       "--sample-steps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["preserve"] == 0.5 and result["last_100_loss"] > 0


def test_object_coverage_is_each_token_s_share_of_pixels_off_the_background(trainer):
    picture = Image.new("RGB", (256, 256), (20, 40, 200))
    picture.paste((250, 250, 250), (0, 0, 32, 24))  # covers tokens (0, 0) and (0, 1) whole, (1, 0) and (1, 1) half
    cover = trainer.object_coverage([picture])[0].view(16, 16)
    assert cover[0, :2].tolist() == [1.0, 1.0] and cover[1, :2].tolist() == [0.5, 0.5]
    assert float(cover.sum()) == 3.0  # nothing else


def test_a_short_run_with_the_seed_weights_schedule_and_average_writes_its_cost(probe, tmp_path):
    out = tmp_path / "p.json"
    assert probe.main(["--steps", "2", "--batch", "4", "--preserve", "1", "--preserve-batch", "2", "--object-weight",
                       "3", "--schedule", "cosine", "--ema", "0.5", "--seed", "3", "--probe", "1", "--sample-steps",
                       "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["seed"] == 3 and result["settings"]["object_weight"] == 3.0
    assert result["cpu_units"] == round(2 * (4 + 1.45 * 2) / 8, 1) and result["last_100_loss"] > 0


def test_rank_0_trains_the_triggers_embeddings_alone_at_their_own_rate(probe, trainer, tmp_path, monkeypatch):
    import torch

    from fluxkiln.plugins.miniflux.weights import load_pipeline

    pipe = load_pipeline("dev")
    assert trainer.trainable(pipe.transformer, 0, False) == []  # no adapter: textual inversion
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    with pytest.raises(SystemExit):
        probe.main(["--rank", "0"])  # nothing would train
    with pytest.raises(SystemExit):
        probe.main(["--rank", "0", "--embeddings", "--lora-scales", "2"])
    groups = []
    real = torch.optim.AdamW

    def recording(params, **kw):
        params = list(params)
        groups.append([(len(g["params"]), g["lr"]) for g in params])
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    out = tmp_path / "p.json"
    assert probe.main(["--rank", "0", "--embeddings", "--new-token", "--lr", "1e-3", "--embedding-lr", "5e-3",
                       "--steps", "2", "--batch", "1", "--probe", "1", "--sample-steps", "1", "--json", str(out)]) == 0
    assert groups == [[(1, 5e-3)]]  # T5's table alone (a new token is T5's), at the embeddings' rate
    assert probe.main(["--embeddings", "--lr", "1e-3", "--embedding-lr", "5e-3", "--steps", "1", "--batch", "1",
                       "--probe", "1", "--sample-steps", "1", "--json", str(out)]) == 0
    assert [rate for _, rate in groups[-1]] == [1e-3, 5e-3] and groups[-1][1][0] == 2  # LoRA, then both tables


def test_a_base_that_knows_more_shapes_is_probed_with_its_samples_read_among_them_too(probe, trainer, tmp_path):
    import torch

    from fluxkiln.plugins.miniflux.trainio import extend_vocabulary
    from fluxkiln.plugins.miniflux.weights import load_pipeline
    from fluxkiln.plugins.miniflux.world import TAUGHT_SHAPES

    pipe = load_pipeline("dev")
    assert probe.known_taught(pipe) == ()
    modules = dict(pipe.components)
    extend_vocabulary(modules, TAUGHT_SHAPES)
    pipe.register_modules(tokenizer_2=modules["tokenizer_2"])
    assert probe.known_taught(pipe) == TAUGHT_SHAPES
    pipe.save_pretrained(tmp_path / "base" / "mini-flux")
    out = tmp_path / "p.json"
    assert probe.main(["--weights", str(tmp_path / "base"), "--steps", "1", "--batch", "1", "--probe", "1",
                       "--sample-steps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["read_among_taught"] == list(TAUGHT_SHAPES)
    taught = ", ".join(TAUGHT_SHAPES)
    assert 0 <= result[f"new prompts with the trigger (not read among {taught})"] <= 100
    assert 0 <= result[f"the same with a known shape (leakage) (not read among {taught})"] <= 100
    new = trainer.add_trigger_token(pipe, "TOK", init="pentagon,octagon")  # started between the two polygons
    table = pipe.text_encoder_2.get_input_embeddings().weight
    rows = [pipe.tokenizer_2(w, add_special_tokens=False)["input_ids"][0] for w in ("pentagon", "octagon")]
    assert torch.allclose(table[new], table[rows].mean(0))


def test_a_pentagon_reads_as_a_hexagon_unless_the_taught_shapes_are_in_the_running():
    import random

    from fluxkiln.plugins.miniflux import render, world
    from fluxkiln.plugins.miniflux.concept import concept_share

    scene = world.Scene((world.Obj("red", "pentagon", "large", "center"),), "blue")
    image = render.to_pil(render.render([world.realise(scene, random.Random(0))], 256, 256, supersample=2))[0]
    leaked = "a large red circle in the center on a blue background"  # a leakage prompt: the shape asked is another
    assert concept_share([image], [leaked], "hexagon") == 1.0  # among the shipped base's shapes: the nearest
    assert concept_share([image], [leaked], "hexagon", world.TAUGHT_SHAPES) == 0.0  # read as what it is


def test_world_preservation_reads_world_prompts_for_every_image_and_mix_for_some(trainer):
    import torch

    swapped = (torch.zeros(4, 8, 3, 2), torch.zeros(4, 8, 5))  # (shapes, captions, ...): zeros
    world = (torch.ones(16, 3, 2), torch.ones(16, 5))  # every world prompt: ones
    kept = torch.arange(8)
    e, p = trainer.preserved_text(swapped, world, kept, torch.Generator().manual_seed(0), "world")
    assert e.shape == (8, 3, 2) and bool((e == 1).all()) and bool((p == 1).all())
    e, p = trainer.preserved_text(swapped, world, kept, torch.Generator().manual_seed(0), "same")
    assert bool((e == 0).all()) and bool((p == 0).all())
    e, _ = trainer.preserved_text(swapped, world, kept, torch.Generator().manual_seed(0), "mix")
    from_world = e.flatten(1).eq(1).all(1)
    assert 0 < int(from_world.sum()) < 8  # per image, some of each at this seed


def test_the_world_prompts_are_of_the_whole_world_and_never_held_out(trainer, monkeypatch):
    from fluxkiln.plugins.miniflux.world import held_out

    seen = []
    monkeypatch.setattr(trainer, "encode_text", lambda pipe, prompts: seen.extend(prompts) or ("e", "p"))
    assert trainer.world_embeddings(None, n=64) == ("e", "p")
    assert len(seen) == 64 and not any(held_out(p) for p in seen)
    assert any(" and " in p for p in seen)  # two-object scenes too


def test_vocab_scores_the_held_out_prompts_with_and_without_the_lora(probe, tmp_path):
    out = tmp_path / "p.json"
    assert probe.main(["--steps", "1", "--batch", "1", "--preserve", "1", "--preserve-prompts", "mix", "--probe",
                       "1", "--sample-steps", "1", "--vocab", "2", "--lora-scales", "1.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    base, scaled = result["vocabulary without the LoRA"], result["vocabulary, LoRA scale 1.5"]
    assert set(base) == set(scaled) >= {"shape", "colour", "all"} and "vocabulary, LoRA scale 1" in result
    assert result["vocabulary shape drop, LoRA scale 1.5"] == round(base["shape"] - scaled["shape"], 1)
    assert result["settings"]["preserve_prompts"] == "mix"
    for wrong in (["--full"], ["--rank", "0", "--embeddings"]):
        with pytest.raises(SystemExit):
            probe.main([*wrong, "--vocab", "2"])  # nothing to switch off


def test_preserve_words_name_the_shapes_in_the_preserved_captions_a_repeated_word_twice(trainer, monkeypatch):
    import torch

    seen = []

    def fake_encode(pipe, captions):
        seen.append(captions)
        return torch.full((len(captions), 2), float(len(seen))), torch.full((len(captions), 3), float(len(seen)))

    monkeypatch.setattr(trainer, "encode_text", fake_encode)
    embeds, pooled = trainer.swapped_embeddings(None, ["a red TOK at the left"], ("star", "star", "circle"))
    assert seen == [["a red star at the left"], ["a red star at the left"], ["a red circle at the left"]]
    assert embeds.shape == (3, 1, 2) and pooled.shape == (3, 1, 3)  # (words, captions, ...)
    seen.clear()
    assert trainer.swapped_embeddings(None, ["a TOK"])[0].shape[0] == 4  # all four known shapes by default
    assert [c[0] for c in seen] == ["a circle", "a square", "a triangle", "a star"]


def test_shape_by_word_scores_the_prompts_naming_each_shape_a_two_shape_prompt_for_both():
    from types import SimpleNamespace

    from fluxkiln.plugins.miniflux.concept import shape_by_word

    prompts = ["a red star on a blue background", "a red star and a green circle on a blue background",
               "a large square at the left", "a blue background"]
    checks = [SimpleNamespace(scores={"shape": s}) for s in (0.0, 0.5, 1.0, None)]  # the last names no shape
    assert shape_by_word(checks, prompts) == {"circle": 50.0, "square": 100.0, "star": 25.0}


def test_concept_by_word_counts_the_prompts_of_each_shape_whose_picture_holds_the_concept():
    import random

    from fluxkiln.plugins.miniflux.concept import _drawn, concept_by_word
    from fluxkiln.plugins.miniflux.world import Obj, Scene, realise

    scenes = [Scene((Obj("red", shape, "large", "left"),), "blue") for shape in ("bowtie", "star", "square")]
    images, _ = _drawn([realise(s, random.Random(1)) for s in scenes], 256)
    prompts = ["a large red star at the left on a blue background"] * 2 + ["a large red square at the left on a "
                                                                         "blue background"]
    assert concept_by_word(images, prompts, "bowtie") == {"star": 50.0, "square": 0.0}  # the first star: a bowtie


def test_a_preservation_set_of_its_own_holds_each_known_shape_or_world_prompts(trainer):
    from fluxkiln.plugins.miniflux.world import SHAPES, held_out, parse

    captions = ["a yellow TOK at the left on a purple background", "a small red TOK on a blue background"]
    same = trainer.preservation_prompts(captions, 8, "same", None)
    assert same == [c.replace("TOK", s) for s in SHAPES for c in captions]  # each caption with each shape in turn
    assert trainer.preservation_prompts(captions, 4, "same", ("star",)) == [c.replace("TOK", "star")
                                                                             for c in captions * 2]
    world = trainer.preservation_prompts(captions, 32, "world", None)
    assert len(world) == 32 and not set(world) & set(same) and not any(held_out(p) for p in world)
    assert all(parse(p).objects for p in world)
    mix = trainer.preservation_prompts(captions, 32, "mix", None)
    assert 0 < sum(p in same for p in mix) < 32  # some of each


def test_rendered_preservation_pictures_show_their_prompts(trainer, monkeypatch):
    from fluxkiln.plugins.miniflux.checker import check

    seen = {}
    monkeypatch.setattr(trainer, "encode", lambda pipe, images, prompts: seen.update(images=images, prompts=prompts)
                        or ("latents", "embeds", "pooled", "coverage"))
    prompts = ["a large red star on a blue background", "a small white square at the top left on a black background"]
    assert trainer.preservation_set(None, prompts, "rendered") == ("latents", "embeds", "pooled")
    assert seen["prompts"] == prompts
    assert all(check(image, prompt).all_right for image, prompt in zip(seen["images"], prompts, strict=True))


def test_a_short_run_preserving_on_generated_pictures_and_half_the_concept_s(probe, trainer, tmp_path, monkeypatch):
    drawn = []
    original = trainer.preservation_set
    monkeypatch.setattr(trainer, "preservation_set",
                        lambda pipe, prompts, kind: drawn.append((len(prompts), kind)) or original(pipe, prompts, kind))
    out = tmp_path / "p.json"
    assert probe.main(["--steps", "2", "--batch", "2", "--preserve", "1", "--preserve-on", "concept+generated",
                       "--preserve-n", "2", "--probe", "1", "--sample-steps", "1", "--json", str(out)]) == 0
    assert drawn == [(2, "generated")]
    result = json.loads(out.read_text())
    assert result["settings"]["preserve_on"] == "concept+generated" and result["last_100_loss"] > 0
    with pytest.raises(SystemExit):
        probe.main(["--preserve-on", "rendered"])  # no --preserve weight


def test_measure_trains_and_samples_on_the_base_folder_the_recipe_names(tmp_path, monkeypatch):
    import shutil

    from fluxkiln.plugins.miniflux import concept, weights

    base = tmp_path / "other-base"
    shutil.copytree(weights.model_path("dev"), base)

    class Sampled(Exception):
        pass

    def load_folder(folder, *args, **kwargs):
        raise Sampled(folder)

    monkeypatch.setattr(weights, "load_folder", load_folder)
    with pytest.raises(Sampled) as sampled:
        concept.measure(3, 1, log=lambda _: None, overrides=[f'nodes.base.model="{base}"', "nodes.lora.resolution=[64]",
                                                            "nodes.lora.sample_every=0", "nodes.images.num_inference_steps=1",
                                                            "nodes.images.num_outputs=1"])
    assert sampled.value.args[0] == base  # not the shipped weights


def test_measure_names_the_file_line_node_and_key_of_a_recipe_that_fails():
    from fluxkiln.plugins.miniflux import concept

    with pytest.raises(SystemExit, match=r"train-lora-tiny\.toml:\d+: node 'base' key 'model': model 'nope/missing' "
                                         r"is not in the local Hugging Face cache.*\(hint: "):
        concept.measure(3, 1, log=lambda _: None, overrides=['nodes.base.model="nope/missing"'])


def test_the_null_space_projector_takes_out_the_fewest_directions_that_hold_the_share(probe):
    import null_space  # bench/, on the path concept_probe put it on
    import torch

    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64))[0]
    strengths = torch.tensor([10.0, 3.0, 1.0], dtype=torch.float64)
    inputs = (torch.randn(500, 3, generator=gen, dtype=torch.float64) * strengths) @ basis.T  # a 3-d subspace of 8
    energy = inputs.T @ inputs
    p, taken = null_space.free_projector(energy, 0.999999)
    assert taken == 3 and torch.allclose(p @ basis, torch.zeros(8, 3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(p @ p, p) and torch.allclose(p, p.T)  # an orthogonal projector onto the other five
    assert null_space.free_projector(energy, 0.5)[1] == 1  # the strongest direction holds about 91 % alone


def test_a_null_space_lora_trains_and_stays_off_the_known_shapes_directions(probe, tmp_path, monkeypatch):
    import null_space
    import torch

    captured = []
    real = null_space.projectors
    monkeypatch.setattr(null_space, "projectors", lambda *a: captured.append(real(*a)) or captured[-1])
    out = tmp_path / "p.json"
    assert probe.main(["--steps", "3", "--batch", "2", "--null-space", "0.99", "--null-space-n", "8", "--probe", "1",
                       "--sample-steps", "1", "--json", str(out)]) == 0
    (pairs, taken), = captured
    assert len(pairs) == len(taken) > 0
    for weight, p in pairs:  # after three optimizer steps each A still lies in its free directions, and moved
        assert torch.allclose(weight @ p, weight, atol=1e-5) and 0 < torch.linalg.matrix_rank(p) < p.shape[0]
    result = json.loads(out.read_text())
    assert result["null_space_directions_taken"] == {"mean": round(sum(taken.values()) / len(taken), 1),
                                                     "min": min(taken.values()), "max": max(taken.values())}
    assert result["cpu_units"] == round(3 * 2 / 8 + 0.4 * 2 * 8 / 8, 1)  # the steps and the recording's forwards
    for wrong in (["--null-space", "1"], ["--null-space", "0.9", "--full"],
                  ["--null-space", "0.9", "--rank", "0", "--embeddings"]):
        with pytest.raises(SystemExit):
            probe.main(wrong)


def test_preservation_at_a_guidance_makes_both_predictions_there(trainer):
    import torch

    from fluxkiln.plugins.miniflux.concept import training_captions
    from fluxkiln.plugins.miniflux.weights import load_pipeline
    from fluxkiln.plugins.train.flow import preservation_loss

    pipe = load_pipeline("dev")
    captions = training_captions()[:2]
    images = [Image.open(p) for p in sorted((ROOT / "recipes" / "data" / "hexagons").glob("*.png"))[:2]]
    latents, embeds, pooled, _ = trainer.encode(pipe, images, captions)
    params = trainer.trainable(pipe.transformer, 4, False)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["guidance"].tolist()),
                                               with_kwargs=True)
    losses = {g: preservation_loss(pipe.transformer, latents, embeds, pooled, torch.Generator().manual_seed(0),
                                   "shift", "cpu", torch.float32, guidance=g).item() for g in (1.0, 3.0)}
    assert seen == [[1.0, 1.0]] * 2 + [[3.0, 3.0]] * 2  # the base's prediction and the adapted one's, at each
    assert losses[1.0] != losses[3.0] and min(losses.values()) > 0


def test_warmup_and_adam_s_epsilon_reach_the_optimizer_and_its_schedule(probe, tmp_path, monkeypatch):
    from fluxkiln.plugins.train import optim

    made = []
    real = optim.make_scheduler
    monkeypatch.setattr(optim, "make_scheduler", lambda opt, *a: made.append((opt, *a)) or real(opt, *a))
    assert probe.main(["--steps", "2", "--batch", "1", "--schedule", "constant_with_warmup", "--warmup", "4",
                       "--adam-eps", "1e-4", "--preserve-guidance", "3", "--preserve", "1", "--probe", "1",
                       "--sample-steps", "1", "--json", str(tmp_path / "p.json")]) == 0
    (opt, kind, warmup, total), = made
    assert (kind, warmup, total) == ("constant_with_warmup", 4, 2) and opt.defaults["eps"] == 1e-4
    assert [g["lr"] for g in opt.param_groups] == [1e-3 * 3 / 4]  # after two steps, the third of four warm-up rates
    with pytest.raises(SystemExit):
        probe.main(["--warmup", "4"])  # a constant rate has no warm-up
