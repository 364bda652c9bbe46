"""``sample`` draws a text-to-image batch's starting noise in a background thread while the call's other work
runs (plugins/flux/noise.py): the images are those of an ordinary diffusers call with the same seeds, the drawn
noise is really what the pipeline uses, and a call that asks for anything else gets freshly drawn noise."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from flux_support import run_body

from fluxkiln.engine.runner import Engine
from fluxkiln.plugins.flux import generate, noise
from fluxkiln.plugins.flux.tiny import build_tiny_flux
from helpers.recipes import load_tiny, sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64


def _tiny():
    p = build_tiny_flux("schnell")
    for m in p.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()  # built, not loaded: in training mode (dropout) until told
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe():
    return _tiny()


@pytest.fixture
def served(monkeypatch):
    """What each ``take`` returned: True where the drawn noise was served."""
    got: list[bool] = []
    take = noise._Drawn.take

    def spy(self, args, generators):
        value = take(self, args, generators)
        got.append(value is not None)
        return value

    monkeypatch.setattr(noise._Drawn, "take", spy)
    return got


def _call(pipe, seeds, size=SIZE):
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(prompt=["a red square"] * len(seeds), width=size, height=size, num_inference_steps=2,
               guidance_scale=0.0, generator=gens, max_sequence_length=32, output_type="pt").images
    return out, gens


def test_the_pipeline_takes_the_noise_drawn_ahead_and_makes_the_same_images(pipe, served):
    reference, _ = _call(pipe, [3, 4])
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]
    with noise.noise_ahead(pipe, (SIZE, SIZE), gens, [3, 4]):
        got = pipe(prompt=["a red square"] * 2, width=SIZE, height=SIZE, num_inference_steps=2, guidance_scale=0.0,
                   generator=gens, max_sequence_length=32, output_type="pt").images
    assert served == [True]
    assert torch.equal(got, reference)
    assert "prepare_latents" not in pipe.__dict__  # the pipeline is itself again


def test_a_call_that_asks_for_another_size_draws_afresh_from_reseeded_generators(pipe, served):
    reference, _ = _call(pipe, [5], size=2 * SIZE)
    gens = [torch.Generator("cpu").manual_seed(5)]
    with noise.noise_ahead(pipe, (SIZE, SIZE), gens, [5]):  # drawn for 64², asked for 128²
        got = pipe(prompt=["a red square"], width=2 * SIZE, height=2 * SIZE, num_inference_steps=2,
                   guidance_scale=0.0, generator=gens, max_sequence_length=32, output_type="pt").images
    assert served == [False]
    assert torch.equal(got, reference)


def test_latents_given_by_the_caller_win_and_the_generators_are_left_as_if_nothing_was_drawn(pipe, served):
    gens = [torch.Generator("cpu").manual_seed(9)]
    mine = torch.zeros(1, (SIZE // 16) ** 2, 64)
    with noise.noise_ahead(pipe, (SIZE, SIZE), gens, [9]):
        latents, _ids = pipe.prepare_latents(1, 16, SIZE, SIZE, torch.float32, torch.device("cpu"), gens, mine)
    assert served == []
    assert torch.equal(latents, mine)
    assert torch.equal(torch.randn(4, generator=gens[0]), torch.randn(4, generator=torch.Generator().manual_seed(9)))


def test_an_offloaded_or_other_pipeline_is_left_alone(pipe):
    gens = [torch.Generator("cpu").manual_seed(1)]
    pipe._fluxkiln_offload = "model"
    try:
        with noise.noise_ahead(pipe, (SIZE, SIZE), gens, [1]):
            assert "prepare_latents" not in pipe.__dict__
    finally:
        del pipe._fluxkiln_offload
    assert torch.equal(torch.randn(4, generator=gens[0]), torch.randn(4, generator=torch.Generator().manual_seed(1)))


def test_sample_images_are_those_of_the_noise_drawn_in_the_call(tmp_path, served, monkeypatch):
    """Through the engine: two images of one prompt (seeds 7 and 8) from the noise drawn ahead are, pixel for
    pixel, what ``sample`` makes with the pipeline drawing its own noise, and on a CPU what a plain diffusers
    call makes (a GPU's compiled path computes differently from plain diffusers)."""
    body = load_tiny(model="builtin:tiny-flux-schnell") + sample(
        "gen", prompt="a red square", aspect_ratio="custom", width=256, height=256, num_inference_steps=2,
        num_outputs=2, seed=7, go_fast=False)
    result = run_body(Engine(cache_dir=tmp_path / "cache"), tmp_path, body)
    assert served == [True]
    got = [np.asarray(item.image) for item in result.outputs["gen"]["output"]]
    monkeypatch.setattr(generate, "noise_ahead", lambda *a, **k: contextlib.nullcontext())
    plain = run_body(Engine(cache_dir=tmp_path / "cache-plain"), tmp_path, body, name="plain")
    assert served == [True]  # not asked again
    for g, w in zip(got, [np.asarray(item.image) for item in plain.outputs["gen"]["output"]], strict=True):
        assert np.array_equal(g, w)
    if torch.cuda.is_available():
        return
    reference = _tiny()
    gens = [torch.Generator("cpu").manual_seed(s) for s in (7, 8)]
    want = reference(prompt="a red square", num_images_per_prompt=2, width=256, height=256, num_inference_steps=2,
                     guidance_scale=0.0, generator=gens, max_sequence_length=256, output_type="np").images
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, (w * 255).round().astype(np.uint8))
