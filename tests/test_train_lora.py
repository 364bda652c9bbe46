"""train_lora learns: the quickstart recipe (tiny FLUX, bundled red squares) end to end, and its outputs."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from test_train_support import load_weights, losses

from fluxkiln.engine.runner import Engine

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "train-lora-tiny.toml"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    result = Engine(cache_dir=tmp / "cache").run(RECIPE, output=tmp / "run")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    return result


def _latent_distance(pipe, prompt: str, target) -> float:
    from fluxkiln.plugins.train.flow import pack

    dists = []
    for seed in range(4):
        with torch.no_grad():
            out = pipe(prompt, height=64, width=64, num_inference_steps=8, guidance_scale=3.5,
                       generator=torch.Generator().manual_seed(seed), output_type="latent").images
        dists.append(float(((out - pack(target)) ** 2).mean()))
    return statistics.mean(dists)


def test_training_learns_the_colour_and_the_loss_falls(quickstart):
    """Samples with the trigger word move towards the training colour.

    The tiny built-in VAE is random and maps every solid colour to nearly the
    same grey, so "closer to the colour" is measured where the model works:
    the distance between generated latents and the VAE latent of the red
    training image (the LoRA is loaded with diffusers' own loader).
    """
    from diffusers import FluxPipeline

    from fluxkiln.plugins.flux.tiny import tiny_flux_path
    from fluxkiln.plugins.train.data import load_image, to_tensor

    got = losses(quickstart)
    assert len(got) == 60
    first, last = statistics.mean(got[:10]), statistics.mean(got[-10:])
    assert last < 0.75 * first, (first, last)

    pipe = FluxPipeline.from_pretrained(tiny_flux_path())
    pipe.set_progress_bar_config(disable=True)
    red = to_tensor(load_image(ROOT / "recipes" / "data" / "solid-red" / "red-1.png"))
    cfg = pipe.vae.config
    with torch.no_grad():
        target = (pipe.vae.encode(red).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor
    before = _latent_distance(pipe, "a photo of TOK", target)
    pipe.load_lora_weights(str(quickstart.outputs["lora"]["lora"].path))
    after = _latent_distance(pipe, "a photo of TOK", target)
    assert after < 0.6 * before, (before, after)


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
    rows = list(csv.DictReader(open(node_dir / "metrics.csv")))
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
