"""mini-flux's training pieces: word-cached tokenisation (the same ids as the tokenizers), the step plan
(steps from the measured step time, cosine by step), and the pools of pre-encoded scenes."""

from __future__ import annotations

import random

import pytest

from fluxkiln.plugins.miniflux import trainparts
from fluxkiln.plugins.miniflux.config import CLIP_TOKENS, TEXT_TOKENS, clip_tokenizer, t5_tokenizer
from fluxkiln.plugins.miniflux.trainconfig import preset
from fluxkiln.plugins.miniflux.world import random_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizers():
    return {"clip": (clip_tokenizer(), CLIP_TOKENS), "t5": (t5_tokenizer(), TEXT_TOKENS)}


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_word_cached_ids_equal_the_tokenizers_own(which, tokenizers):
    tok, length = tokenizers[which]
    rng = random.Random(3)
    prompts = [random_scene(rng, fillers=0.6).prompt for _ in range(60)]
    prompts += ["", "A Red circle, at the LEFT!", "a  red circle", " a red", "zzz qqq " * 21, "a tok hexagon"]
    cached = trainparts.WordTokens(tok, length)(prompts)
    own = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    assert cached.shape == own.shape == (len(prompts), length)
    assert (cached == own).all()


def _run_plan(monkeypatch, seconds: float, step_time, start: float = 0.0):
    """Run a Plan to its end on a fake clock where step ``i`` takes ``step_time(i)`` seconds."""
    clock = [start]
    monkeypatch.setattr(trainparts.time, "monotonic", lambda: clock[0])
    plan = trainparts.Plan(seconds=seconds, lr=1.0, warmup=4, probe=5)
    step = 0
    while not plan.done(step):
        clock[0] += step_time(step)
        step += 1
        assert step < 5000
    return plan, step, clock[0] - start


def test_the_plan_counts_steps_from_the_measured_step_time(monkeypatch):
    plan, step, _ = _run_plan(monkeypatch, 10.0, lambda i: 0.1, start=100.0)  # every step takes 0.1 s
    assert plan.total == 100 and step == 100
    assert plan.rate(0) == pytest.approx(0.25)  # warm-up
    assert plan.rate(50) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine, by steps
    assert plan.rate(100) == pytest.approx(0.1)


def test_the_plan_stops_at_its_budget_whatever_the_step_count(monkeypatch):
    plan, step, _ = _run_plan(monkeypatch, 10.0, lambda i: 0.01 if i < 10 else 1.0)  # slower after the probe
    assert plan.total == 1000 and step < 30


def test_the_plan_is_made_again_once_the_first_slow_steps_are_behind(monkeypatch):
    plan, step, used = _run_plan(monkeypatch, 100.0, lambda i: 0.3 if i < 10 else 0.1)  # a GPU's first steps
    # planned at step 10 from 0.3 s steps (300 steps); again at 50 and 200 from the faster ones
    assert used >= 95.0 and step >= 900, (used, step)


def test_pools_hold_encoded_scenes_with_their_ids_and_drop_captions(tokenizers):
    import torch
    from diffusers import AutoencoderKL

    from fluxkiln.plugins.miniflux.config import VAE
    from fluxkiln.plugins.miniflux.pool import Pools

    torch.manual_seed(0)
    enc = trainparts.TextEncoder(None, tokenizers["clip"][0], None, tokenizers["t5"][0], "cpu")  # ids only
    pools = Pools(32, capacity=8, multi_capacity=0, chunk=4, vae=AutoencoderKL(**VAE), enc=enc,
                  rng=random.Random(1), device="cpu", share=0.0)
    pools.fill(0.0, log=lambda _: None)
    native = pools.pools[(32, 32)]
    assert list(pools.pools) == [(32, 32)] and native.filled == 4
    assert native.tensors["latents"].shape == (8, 16, 4, 4)
    d = pools.batch(6, multi_res=0.0)
    assert d.latents.shape == (6, 16, 4, 4) and d.clip.shape == (6, CLIP_TOKENS) and d.t5.shape == (6, TEXT_TOKENS)
    assert d.t5_labels.shape == (6, TEXT_TOKENS, 5) and d.pooled_labels.shape == (6, 4)
    assert d.cover.shape == (6, 4) and 0 <= d.cover.min() and d.cover.max() <= 1 and d.cover.sum() > 0
    assert not (d.t5 == pools.empty[1]).all(dim=1).any()
    assert ((d.t5_labels[..., 0] >= 0).sum(1) > 0).all()  # every caption has labelled words
    d = pools.batch(6, multi_res=0.0, dropout=1.0)
    assert (d.t5 == pools.empty[1]).all() and (d.clip == pools.empty[0]).all()
    assert (d.t5_labels == -1).all() and (d.pooled_labels == -1).all()  # dropped captions teach no roles
    native.fill_chunk()
    native.fill_chunk()  # wraps round, over the oldest entries
    assert native.filled == 8 and native.cursor == 4 and native.made == 12


def test_object_coverage_marks_the_objects_latent_tokens():
    import torch

    from fluxkiln.plugins.miniflux.render import render
    from fluxkiln.plugins.miniflux.world import Drawn, Layout

    layout = Layout("blue", (Drawn("red", "square", 0.25, 0.25, 0.2),))
    images, cover = render([layout], 64, 64, masks=True)
    assert cover.shape == (1, 64, 64)
    red = (images[0, 0] > 0.5) & (images[0, 2] < 0)
    assert torch.equal(cover[0] > 0.5, red)
    assert torch.equal(render([layout], 64, 64), images)


def test_saved_pipelines_do_not_record_where_they_were_continued_from(tmp_path):
    """Continuing from a folder makes diffusers write its absolute path into the configs; save drops it."""
    from fluxkiln.plugins.miniflux import trainio
    from fluxkiln.plugins.miniflux.weights import model_path

    modules = trainio.load_modules(model_path("dev"))
    assert modules["transformer"].config.get("_name_or_path")  # what would leak
    out = tmp_path / "out"
    out.mkdir()
    folder = trainio.save(modules, modules["transformer"], "dev", tmp_path / "work", out)
    configs = list(folder.glob("*/config.json"))
    assert {c.parent.name for c in configs} >= {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert not [c for c in configs if "_name_or_path" in c.read_text() or str(tmp_path) in c.read_text()]
    assert (out / "mini-flux.tar").is_file()


FAST = ["--preset", "micro", "--set", "vae_seconds=2", "--set", "pool_seconds=1", "--set", "text_seconds=2",
        "--set", "base_seconds=4", "--set", "guide_seconds=2", "--set", "schnell_seconds=2", "--set",
        "check_every=4", "--set", "select_prompts=1", "--set", "eval_prompts=0"]


def _run_training(tmp_path, launcher: list[str], *extra: str):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, *launcher, "-m", "fluxkiln.plugins.miniflux.train", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), *FAST, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _check_outputs(tmp_path, ranks: int):
    import json
    import tarfile

    from fluxkiln.plugins.miniflux.weights import load_pipeline

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["ranks"] == ranks and metrics["ranks_agree"] is True
    assert metrics["text_steps"] > 0 and set(metrics["text_accuracy"]) >= {"role", "colour", "pooled background"}
    assert metrics["base_checks"] and {"true", "shuffled", "roles swapped"} <= set(metrics["base_checks"][-1])
    assert {"colour", "shape", "position", "background"} <= set(metrics["vae_roundtrip"])
    assert set(metrics["base_cfg"]) == {"1.0", "3.0", "5.0"}  # the base's adherence under true CFG
    assert all({"colour", "shape", "position", "background"} <= set(row) for row in metrics["base_cfg"].values())
    for name in ("mini-flux", "mini-flux-schnell"):
        with tarfile.open(tmp_path / "out" / f"{name}.tar") as tar:
            assert f"{name}/transformer/diffusion_pytorch_model.safetensors" in tar.getnames()
    from fluxkiln.plugins.miniflux.config import build_modules

    pipe = load_pipeline("dev", tmp_path / "work")  # a standard FluxPipeline folder: the aux heads are not in it
    fresh = build_modules("dev")
    for part in ("text_encoder", "text_encoder_2", "transformer"):
        assert set(getattr(pipe, part).state_dict()) == set(fresh[part].state_dict())
    return metrics


def test_the_micro_preset_trains_every_phase_in_one_process_keeping_the_shipped_vae(tmp_path):
    """... and, with ``more_shapes``, saves pipelines whose T5 knows the taught words."""
    import torch
    from diffusers import AutoencoderKL

    from fluxkiln.plugins.miniflux.weights import load_pipeline, model_path

    out = _run_training(tmp_path, [], "--set", 'vae_init="shipped"', "--set", "vae_seconds=0",
                        "--set", 'more_shapes="pentagon,octagon"', "--set", 'shape_weights="star:2,octagon:2"')
    metrics = _check_outputs(tmp_path, 1)
    assert metrics["config"]["shape_weights"] == "star:2,octagon:2"
    shares = metrics["pool_shapes"]  # % of the pools' objects: star and octagon twice as often as each other
    assert set(shares) == {"circle", "square", "triangle", "star", "pentagon", "octagon"}
    assert shares["star"] > max(shares["circle"], shares["square"], shares["triangle"], shares["pentagon"])
    assert shares["octagon"] > max(shares["circle"], shares["square"], shares["triangle"], shares["pentagon"])
    assert metrics["base_choice"]["kept"] in ("ema", "raw") and "vae_steps" not in metrics
    assert metrics["words_added"] == ["pentagon", "octagon"]
    for variant in ("dev", "schnell"):
        pipe = load_pipeline(variant, tmp_path / "work")
        assert [len(pipe.tokenizer_2(w, add_special_tokens=False).input_ids) for w in ("pentagon", "octagon")] == [1, 1]
        assert pipe.text_encoder_2.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer_2)
    assert out.count("saved ") == 3  # dev after base, dev after guidance distillation, schnell
    shipped = AutoencoderKL.from_pretrained(str(model_path("dev") / "vae")).state_dict()
    saved = AutoencoderKL.from_pretrained(str(tmp_path / "work" / "mini-flux" / "vae")).state_dict()
    assert all(torch.equal(shipped[k], saved[k]) for k in shipped)


def test_a_decoder_only_vae_phase_keeps_the_encoder_and_weighs_the_objects():
    import torch
    from diffusers import AutoencoderKL

    from fluxkiln.plugins.miniflux import train
    from fluxkiln.plugins.miniflux.config import VAE
    from fluxkiln.plugins.miniflux.dist import World

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    cfg = preset("micro", vae_part="decoder", vae_object_weight=3.0, vae_seconds=2.0, vae_batch=2, native=32)
    info = train.train_vae(cfg, vae, random.Random(0), World())
    after = vae.state_dict()
    assert info["vae_steps"] >= 1
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    batch = trainparts.make_batch(random.Random(1), 2, (32, 32), "cpu", masks=True)
    losses = []
    for weight in (0.0, 3.0):
        torch.manual_seed(2)
        losses.append(train._vae_loss(preset("micro", vae_object_weight=weight), vae, batch, True).item())
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)
    with pytest.raises(SystemExit, match="vae_part: 'encoder' is not one of all, decoder"):
        preset("micro", vae_part="encoder")


def test_true_cfg_guides_against_the_empty_prompt_and_one_means_none():
    import numpy as np

    from fluxkiln.plugins.miniflux.adherence import generate
    from fluxkiln.plugins.miniflux.weights import load_pipeline

    pipe = load_pipeline("dev")
    pipe.set_progress_bar_config(disable=True)
    prompt = ["a large red circle at the left on a blue background"]
    def image(**cfg):
        return np.asarray(generate(pipe, prompt, steps=3, guidance=1.0, width=64, height=64, **cfg)[0], dtype=float)

    plain, one, four = image(), image(true_cfg=1.0), image(true_cfg=4.0)
    assert np.array_equal(plain, one)
    assert np.abs(four - one).mean() > 1.0


def test_a_vae_init_without_a_vae_is_refused_with_the_folder_named(tmp_path):
    from fluxkiln.plugins.miniflux.trainio import load_vae

    with pytest.raises(SystemExit, match=f"vae_init: {tmp_path} has no vae/config.json"):
        load_vae(str(tmp_path))


def test_the_plan_follows_rank_0s_decisions():
    """Another rank's own clock does not matter: at the planning step and every ``every`` steps it takes rank 0's
    verdict (stop or not) and step count."""

    class Rank1:
        size, calls = 2, []

        def agree(self, *values):
            self.calls.append(values)
            return [0.0, 40.0] if len(self.calls) < 3 else [1.0, 40.0]

    world = Rank1()
    plan = trainparts.Plan(seconds=1e9, lr=1.0, warmup=1, probe=5, world=world, every=10)
    steps = 0
    while not plan.done(steps):
        steps += 1
    assert plan.total == 40 and steps == 20  # agreed at 0, 10 (the planning step), then told to stop at 20
    assert len(world.calls) == 3


def test_two_gloo_ranks_train_together_and_only_rank_0_writes(tmp_path):
    out = _run_training(tmp_path, ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])
    _check_outputs(tmp_path, 2)
    assert out.count("saved ") == 3 and out.count("text: ") == 1  # rank 1 neither logs nor saves
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "mini-flux-schnell.tar",
                                                                      "mini-flux.tar"]


def test_role_swapped_pairs_are_training_scenes_drawn_side_by_side(tokenizers):
    import torch
    from diffusers import AutoencoderKL

    from fluxkiln.plugins.miniflux.config import VAE
    from fluxkiln.plugins.miniflux.pool import Pool
    from fluxkiln.plugins.miniflux.roles import swap_roles
    from fluxkiln.plugins.miniflux.world import Scene, held_out

    batch = trainparts.make_batch(random.Random(4), 200, (32, 32), "cpu", pairs=1.0, fillers=0.0)
    scenes = batch.scenes
    swapped = [k for k in range(1, 200, 2) if scenes[k] == swap_roles(scenes[k - 1])]
    assert len(swapped) > 60  # most pairs (not those without a background or where a swap would be held out)
    assert not any(held_out(Scene(s.objects, s.background).prompt) for s in scenes)
    k = swapped[0]
    assert scenes[k].background == scenes[k - 1].objects[0].colour
    assert scenes[k].objects[0].colour == scenes[k - 1].background
    torch.manual_seed(0)
    enc = trainparts.TextEncoder(None, tokenizers["clip"][0], None, tokenizers["t5"][0], "cpu")
    pool = Pool((32, 32), 16, 8, AutoencoderKL(**VAE), enc, random.Random(2), "cpu", pairs=1.0)
    pool.fill_chunk()
    pool.fill_chunk()
    pool.tensors["t5"] = torch.arange(16)[:, None]  # row numbers, to see which rows a sample takes
    rows = pool.sample(10).t5[:, 0].tolist()
    assert all(a % 2 == 0 and b == a + 1 for a, b in zip(rows[::2], rows[1::2], strict=True))


def test_the_flow_loss_weights_object_tokens_up():
    import torch

    from fluxkiln.plugins.miniflux.base import flow_loss

    pred, target = torch.zeros(1, 2, 4), torch.tensor([[[1.0] * 4, [0.0] * 4]])  # error on token 0 only
    assert flow_loss(pred, target, torch.zeros(1, 2), 3.0).item() == pytest.approx(0.5)  # plain mean
    assert flow_loss(pred, target, torch.tensor([[1.0, 0.0]]), 3.0).item() == pytest.approx(4 / 5)
    assert flow_loss(pred, target, torch.tensor([[0.0, 1.0]]), 3.0).item() == pytest.approx(1 / 5)


def test_continuing_keeps_the_vae_of_init_unless_vae_init_is_given():
    """The full preset takes the shipped VAE when training from scratch; a run continuing from ``init`` must keep
    the VAE its transformer was trained with (a decoder fine-tuned in an earlier call), not swap the shipped one in."""
    assert preset("full").vae_init == "shipped"
    assert preset("full", init="/w/mini-flux").vae_init == ""
    assert preset("full", init="/w/mini-flux", vae_init="/v/mini-flux").vae_init == "/v/mini-flux"
    assert preset("full", init="").vae_init == "shipped"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("base_seconds", "abc", "base_seconds: 'abc' is not a number; e.g. --set base_seconds=10"),
    ("base_seconds", True, "base_seconds: True is not a number"),
    ("guide_range", 2.0, r"guide_range: 2.0 is not a list; e.g. --set guide_range='\[1.0, 6.0\]'"),
    ("init", 3, "init: 3 is not a string; write it in quotes, e.g. --set init='\"3\"'"),
    ("more_shapes", ["cross", "diamond"],
     r"more_shapes: \['cross', 'diamond'\] is not a string; write it in quotes, "
     r"e.g. --set more_shapes='\"cross,diamond\"'"),
])
def test_a_setting_of_the_wrong_kind_is_refused_with_an_example(key, value, message):
    with pytest.raises(SystemExit, match=message):
        preset("micro", **{key: value})
    assert preset("micro", base_seconds=12).base_seconds == 12  # a whole number where a float is expected is fine


def test_a_set_value_that_is_not_json_says_how_to_quote_it(tmp_path, capsys):
    from fluxkiln.plugins.miniflux import train

    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--preset", "micro", "--set", "shape_weights=star:2"])
    assert "--set 'shape_weights=star:2': the value is read as JSON, so a string goes in quotes: " \
           "--set shape_weights='\"star:2\"'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work
