"""train_lora learns: the quickstart recipe (tiny FLUX, bundled red squares) end to end, and its outputs."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_train_support import load_weights, losses

from fluxkiln.engine.runner import Engine

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tests" / "recipes" / "train-lora-tiny-flux.toml"  # the tiny-FLUX version of the recipe
RED_SQUARE = ROOT / "recipes" / "data" / "solid-red" / "red-1.png"  # the quickstart's training colour


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    result = Engine(cache_dir=tmp / "cache").run(RECIPE, output=tmp / "run")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    return result


def _samples(pipe, prompt: str, size: int = 64, seeds=range(4), guidance: float = 3.5) -> list[tuple[np.ndarray, Any]]:
    """(RGB pixels, final packed latents) of one sample per seed."""
    return [_sample(pipe, prompt, size, seed, guidance) for seed in seeds]


def _sample(pipe, prompt: str, size: int, seed: int, guidance: float) -> tuple[np.ndarray, Any]:
    seen = []

    def keep(_pipe, _step, _timestep, kwargs):
        seen.append(kwargs["latents"])
        return {}

    with torch.no_grad():
        image = pipe(prompt, height=size, width=size, num_inference_steps=8, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(seed), callback_on_step_end=keep).images[0]
    return _pixels(image), seen[-1]


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _colour_distance(pixels: np.ndarray) -> float:
    """Distance (0..441) between an image's mean colour and the training colour."""
    from PIL import Image

    red = _pixels(Image.open(RED_SQUARE)).reshape(-1, 3).mean(0)
    return float(np.linalg.norm(pixels.reshape(-1, 3).mean(0) - red))


def _redness(pixels: np.ndarray) -> float:
    r, g, b = pixels.reshape(-1, 3).mean(0)
    return float(r - (g + b) / 2)


@pytest.mark.timeout(300)  # with its fixture: 60 compiled training steps on a GPU, then 9 samples on the CPU (over
# 120 s beside 15 xdist workers on an H200)
def test_training_learns_the_colour_and_the_loss_falls(quickstart):
    """Samples with the trigger word turn red, in pixels, after training on red squares.

    The untrained tiny model's samples are colourful noise around grey; after the
    quickstart's 60 steps the same prompt and seeds give red pictures: the mean
    colour moves most of the way to the training colour (220, 40, 40), for every
    seed, and the generated latents move towards the training image's latent
    (the LoRA is loaded with diffusers' own loader).  The recipe's own image
    (apply_lora -> sample) is red too.
    """
    from diffusers import FluxPipeline

    from fluxkiln.plugins.flux.tiny import tiny_flux_path
    from fluxkiln.plugins.train.data import load_image, to_tensor
    from fluxkiln.plugins.train.flow import pack

    got = losses(quickstart)
    assert len(got) == 60
    first, last = statistics.mean(got[:10]), statistics.mean(got[-10:])
    assert last < 0.75 * first, (first, last)

    pipe = FluxPipeline.from_pretrained(tiny_flux_path())
    pipe.set_progress_bar_config(disable=True)
    red = to_tensor(load_image(RED_SQUARE))
    cfg = pipe.vae.config
    with torch.no_grad():
        target = pack((pipe.vae.encode(red).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor)
    before = _samples(pipe, "a photo of TOK")
    untrained_42 = _samples(pipe, "a photo of TOK", size=128, seeds=[42], guidance=3.0)[0][0]  # as [nodes.images]
    pipe.load_lora_weights(str(quickstart.outputs["lora"]["lora"].path))
    after = _samples(pipe, "a photo of TOK")

    dist_before = [_colour_distance(px) for px, _ in before]
    dist_after = [_colour_distance(px) for px, _ in after]
    assert all(a < 0.8 * b for a, b in zip(dist_after, dist_before)), (dist_before, dist_after)
    assert statistics.mean(dist_after) < 0.6 * statistics.mean(dist_before), (dist_before, dist_after)
    assert max(_redness(px) for px, _ in before) < 30, "the untrained model's samples are not red already"
    assert min(_redness(px) for px, _ in after) > 60, "samples with the trigger word are red"

    lat_before = statistics.mean(float(((lat - target) ** 2).mean()) for _, lat in before)
    lat_after = statistics.mean(float(((lat - target) ** 2).mean()) for _, lat in after)
    assert lat_after < 0.6 * lat_before, (lat_before, lat_after)

    made = _pixels(quickstart.outputs["images"]["output"][0].image)
    assert made.shape == untrained_42.shape == (128, 128, 3)
    assert _redness(made) > 60 and _redness(untrained_42) < 30
    assert _colour_distance(made) < 0.6 * _colour_distance(untrained_42)


def test_the_tiny_vae_keeps_solid_colours():
    """The premise of the pixel test: builtin:tiny-flux's VAE round-trips flat colours (a random one greys them)."""
    from diffusers import AutoencoderKL

    from fluxkiln.plugins.flux.tiny import tiny_flux_path

    vae = AutoencoderKL.from_pretrained(tiny_flux_path(), subfolder="vae")
    colours = np.array([(220, 40, 40), (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128), (0, 0, 0),
                        (255, 255, 255)])
    flat = torch.tensor(colours / 127.5 - 1, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 64, 64)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(flat).latent_dist.mode()).sample
    means = ((decoded.clamp(-1, 1) + 1) * 127.5).mean((2, 3)).numpy()
    assert np.abs(means - colours).max() < 10, means.round()


def test_outputs_files_metadata_and_events(quickstart):
    lora = quickstart.outputs["lora"]["lora"]
    node_dir = quickstart.run_dir / "lora"
    weights = load_weights(lora.path)
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in weights)
    assert "transformer.single_transformer_blocks.0.proj_out.lora_A.weight" in weights
    from safetensors import safe_open

    with safe_open(str(lora.path), framework="pt") as f:
        meta = f.metadata()
    assert meta["fluxkiln.base_model"] == "builtin:tiny-flux" and meta["fluxkiln.trigger_word"] == "TOK"
    assert meta["fluxkiln.rank"] == "16" and meta["fluxkiln.alpha"] == "16" and meta["fluxkiln.steps"] == "60"
    ds = quickstart.outputs["data"]["output"]
    assert meta["fluxkiln.dataset_fingerprint"] == ds.fingerprint and len(ds.fingerprint) == 64
    assert "[nodes.lora]" in meta["fluxkiln.recipe"] and json.loads(meta["fluxkiln.params"])["steps"] == 60
    assert lora.meta == {k: v for k, v in meta.items() if k != "format"}

    # The ComfyUI/kohya copy holds the same LoRA: converting it back gives the same deltas.
    from fluxkiln.plugins.flux.lora_keys import to_peft

    comfy = load_weights(lora.extra_files["comfyui"])
    assert comfy and all(k.startswith("lora_unet_") for k in comfy)
    back = to_peft(comfy).state_dict
    for module in {k.rsplit(".lora_", 1)[0] for k in weights}:
        a, b = weights[module + ".lora_A.weight"].float(), weights[module + ".lora_B.weight"].float()
        a2, b2 = back[module + ".lora_A.weight"].float(), back[module + ".lora_B.weight"].float()
        assert torch.allclose(b @ a, b2 @ a2, atol=1e-2, rtol=1e-2), module

    captions = [json.loads(line) for line in (node_dir / "captions.jsonl").read_text().splitlines()]
    assert {c["trained_caption"] for c in captions} >= {"a photo of TOK", "TOK, plain background"}
    assert "red-1.png: a photo of TOK" in quickstart.outputs["lora"]["captions"]
    rows = list(csv.DictReader((node_dir / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, 61)) and float(rows[0]["lr"]) == pytest.approx(5e-3)
    assert (node_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = sorted(p.name for p in (node_dir / "samples").iterdir())
    assert samples == ["step-000030-00.png", "step-000060-00.png"]
    arts = set(quickstart.artifacts("lora"))
    for name in ("lora.safetensors", "lora_comfyui.safetensors", "captions.jsonl", "metrics.csv", "loss.png"):
        assert str(node_dir / name) in arts

    progress = [e for e in quickstart.events if e.event == "node_progress" and e.node == "lora"]
    metric = [e for e in progress if e.data.get("metrics")]
    assert [e.data["step"] for e in metric] == list(range(1, 61))
    assert all(e.data["total"] == 60 and {"loss", "lr"} <= set(e.data["metrics"]) for e in metric)
    assert "eta" in metric[-2].data and "rate" in metric[-2].data
    previews = [e for e in progress if "preview" in e.objects]
    assert [e.data["step"] for e in previews] == [30, 60]
    assert previews[0].objects["preview"].size == (64, 64) and previews[0].data["preview_path"].endswith(".png")

    images = quickstart.outputs["images"]["output"]
    assert len(images) == 1 and images[0].meta["loras"] == [{"file": "lora.safetensors", "scale": 1.0}]


def test_a_cached_run_into_a_new_folder_gets_every_file_incl_the_lora(quickstart, tmp_path):
    import os
    import subprocess
    import sys

    new = tmp_path / "again"
    env = {**os.environ, "FLUXKILN_CACHE": str(quickstart.run_dir.parent / "cache")}
    res = subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", "run", str(RECIPE), "--output", str(new),
                          "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    finished = json.loads(res.stdout.splitlines()[-1])
    assert set(finished["nodes"].values()) == {"cached"}
    written = [Path(a) for a in quickstart.artifacts()]
    rels = {a.relative_to(quickstart.run_dir) for a in written if a.is_relative_to(quickstart.run_dir)}
    assert {Path("lora/lora.safetensors"), Path("lora/lora_comfyui.safetensors"), Path("saved_0.png")} <= rels
    assert any(r.parts[:2] == ("lora", "samples") for r in rels)
    for rel in rels:
        assert (new / rel).read_bytes() == (quickstart.run_dir / rel).read_bytes(), rel
    assert "../" not in (new / "report.md").read_text()
