"""Every step's modulation computed as a sampling call starts (plugins/flux/modulation.py).

On a CPU the tiny FLUX pipeline runs through the transformer's whole-step call (graphs off, as on a CPU they
cannot record): inside ``modulation.steps`` one table serves every step, outside it each call computes its own
rows, and the images equal those of the untouched transformer.  On a CUDA GPU ``sample`` installs it and its
images equal those made with it switched off, to within bf16's rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxkiln.plugins.flux import graphed, modulation
from fluxkiln.plugins.flux.pipestate import plan
from fluxkiln.plugins.flux.tabled import Tabled
from fluxkiln.plugins.flux.tiny import build_tiny_flux

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def reference():
    """A tiny dev pipeline and its images, untouched (float32, CPU)."""
    pipe = build_tiny_flux("dev")
    return pipe, {key: images(pipe, *key) for key in (("a red fox", 1), ("two owls", 2))}


def images(pipe, prompt: str, n: int, **extra) -> np.ndarray:
    with torch.no_grad():
        out = pipe(prompt=prompt, num_images_per_prompt=n, width=64, height=64, num_inference_steps=4,
                   guidance_scale=3.5, generator=torch.Generator().manual_seed(7), output_type="np",
                   max_sequence_length=32, **extra).images
    return np.asarray(out)


def direct_inputs(seed: int, **extra) -> dict:
    """A call of the tiny transformer itself (16 image and 32 text tokens), outside any pipeline."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 32, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), guidance=torch.tensor([3.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(32, 3), return_dict=False, **extra)


@pytest.fixture
def tabled(reference, monkeypatch):
    monkeypatch.setenv("FLUXKILN_CUDA_GRAPHS", "0")  # a CPU cannot record; the whole-step call still fills
    pipe = reference[0]
    graphed.install(pipe.transformer)
    n = modulation.install(pipe.transformer)
    yield pipe, n
    modulation.remove(pipe.transformer)
    graphed.remove(pipe.transformer)


def test_every_adaptive_norm_linear_is_tabled_and_removing_puts_them_back(tabled):
    pipe, n = tabled
    t = pipe.transformer
    linears = [m for m in t.modules() if isinstance(m, Tabled)]
    assert n == len(linears) == 2 * len(t.transformer_blocks) + len(t.single_transformer_blocks) + 1
    assert modulation.install(t) == n and len([m for m in t.modules() if isinstance(m, Tabled)]) == n  # once
    originals = [m.original for m in linears]
    assert modulation.remove(t) == n and not modulation.active(t)
    assert t.norm_out.linear is originals[-1] and t.transformer_blocks[0].norm1.linear is originals[0]
    assert not any(isinstance(m, Tabled) for m in t.modules()) and modulation.remove(t) == 0


def test_one_table_serves_every_step_of_a_call_and_the_images_are_the_same(reference, tabled):
    pipe = tabled[0]
    with modulation.steps(pipe):
        got = images(pipe, "a red fox", 1)
    stats = modulation.stats(pipe.transformer)
    assert (stats.built, stats.looked_up, stats.computed) == (1, 4, 0)
    np.testing.assert_allclose(got, reference[1][("a red fox", 1)], atol=1e-5)
    with modulation.steps(pipe):  # a new call: a new schedule, so a new table
        images(pipe, "a red fox", 1)
    assert stats.built == 2 and getattr(pipe.transformer, modulation.ATTR).table is None  # freed as the call ends


def test_outside_a_sampling_call_each_call_computes_its_own_rows(reference, tabled):
    pipe = tabled[0]
    got = images(pipe, "a red fox", 1)
    stats = modulation.stats(pipe.transformer)
    assert (stats.built, stats.looked_up, stats.computed) == (0, 0, 4)
    np.testing.assert_allclose(got, reference[1][("a red fox", 1)], atol=1e-5)


def test_batch_sizes_keep_their_own_rows(reference, tabled):
    pipe = tabled[0]
    for key in (("two owls", 2), ("a red fox", 1), ("two owls", 2)):
        with modulation.steps(pipe):
            np.testing.assert_allclose(images(pipe, *key), reference[1][key], atol=1e-5, err_msg=str(key))
    assert modulation.stats(pipe.transformer).built == 3


def test_true_cfg_alternating_prompts_computes_call_by_call(reference, tabled):
    pipe = reference[0]
    modulation.remove(pipe.transformer)
    want = images(pipe, "a red fox", 1, negative_prompt="blurry", true_cfg_scale=2.0)
    modulation.install(pipe.transformer)
    with modulation.steps(pipe):
        got = images(pipe, "a red fox", 1, negative_prompt="blurry", true_cfg_scale=2.0)
    stats = modulation.stats(pipe.transformer)
    assert stats.built == 1 and stats.looked_up == 1 and stats.computed == 7  # the second prompt gives it up
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_timestep_not_in_the_schedule_is_computed_alone(reference, tabled):
    pipe = tabled[0]
    t = pipe.transformer
    kw = direct_inputs(1, timestep=torch.tensor([0.123]))
    pipe.scheduler.set_timesteps(4, mu=0.5)
    with torch.no_grad(), modulation.steps(pipe):
        got = t(**kw)[0]
    assert modulation.stats(t).computed == 1 and modulation.stats(t).built == 0
    modulation.remove(t)
    with torch.no_grad():
        np.testing.assert_allclose(got, t(**kw)[0], atol=1e-5)


def test_a_step_the_table_does_not_list_fails_the_call_as_it_ends(reference, tabled):
    pipe = tabled[0]
    t = pipe.transformer
    kw = direct_inputs(2)
    pipe.scheduler.set_timesteps(4, mu=0.5)
    listed = pipe.scheduler.timesteps[:1] / 1000
    with pytest.raises(RuntimeError, match="FLUXKILN_MODULATION_TABLE=0"), torch.no_grad(), modulation.steps(pipe):
        t(timestep=listed, **kw)  # builds the table
        t(timestep=listed, **kw)  # served from it
        t(timestep=torch.tensor([0.123]), **kw)  # the same prompt, a step it does not list
    assert modulation.stats(t).built == 1 and modulation.stats(t).looked_up == 3
    with torch.no_grad(), modulation.steps(pipe):  # the next call starts afresh
        t(timestep=listed, **kw)


def test_buffers_follow_the_transformer_when_it_is_moved_or_cast(reference, tabled):
    pipe = tabled[0]
    images(pipe, "a red fox", 1)
    pipe.transformer.to(torch.float64).to(torch.float32)  # .to() gives every buffer a new tensor
    rows = pipe.transformer.norm_out.linear.rows
    assert rows.dtype == torch.float32
    np.testing.assert_allclose(images(pipe, "a red fox", 1), reference[1][("a red fox", 1)], atol=1e-5)
    flat = getattr(pipe.transformer, modulation.ATTR).buffers[1]
    now = pipe.transformer.norm_out.linear.rows
    assert now.data_ptr() != rows.data_ptr() and now.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_a_call_without_the_inputs_it_needs_says_so(tabled):
    with pytest.raises(TypeError, match="pooled_projections"):
        modulation.fill(tabled[0].transformer, (), {"hidden_states": torch.zeros(1), "timestep": torch.zeros(1)})


def test_sample_plans_it_on_a_gpu_with_compiled_blocks_only(reference, monkeypatch):
    pipe = reference[0]
    assert not plan(pipe, {}, False, False, "cpu", fast=True).modulation
    assert plan(pipe, {}, False, False, "cuda", fast=True).modulation
    assert not plan(pipe, {}, False, False, "cuda", fast=False).modulation  # training: exact layers
    monkeypatch.setenv("FLUXKILN_MODULATION_TABLE", "0")
    assert not plan(pipe, {}, False, False, "cuda", fast=True).modulation
    monkeypatch.delenv("FLUXKILN_MODULATION_TABLE")
    monkeypatch.setenv("FLUXKILN_COMPILE_MODE", "reduce-overhead")  # the blocks' own graphs: no whole-step call
    assert not plan(pipe, {}, False, False, "cuda", fast=True).modulation


@gpu
def test_sample_on_a_gpu_tables_the_modulation_and_makes_the_same_images(tmp_path, monkeypatch):
    from flux_support import run_body

    from fluxkiln.engine.runner import Engine
    from fluxkiln.plugins.flux.load import get_pipeline

    recipe = ('[nodes.base]\ntype = "load_model"\nmodel = "builtin:tiny-flux"\ndtype = "bfloat16"\n'
              '[nodes.img]\ntype = "sample"\nmodel = "@base"\nprompt = ["a red fox", "a blue bird"]\n'
              'aspect_ratio = "custom"\nwidth = 256\nheight = 256\nnum_inference_steps = 4\nseed = 3\n')
    result = run_body(Engine(cache_dir=tmp_path / "cache"), tmp_path, recipe, "tabled")
    pipe = get_pipeline(result.outputs["base"]["output"])
    stats = modulation.stats(pipe.transformer)
    assert stats is not None and stats.built == 1 and stats.looked_up == 4, stats
    monkeypatch.setenv("FLUXKILN_MODULATION_TABLE", "0")
    plain = run_body(Engine(cache_dir=tmp_path / "cache2"), tmp_path, recipe, "plain")
    # One batched bf16 product for every step against one product a step: the rows round differently in the last
    # bit, which moves a few pixels by a few levels — on one H200 at most 2, on another machine's H200 4 (mean
    # 0.005 levels); a wrong table (another step's rows) moves most pixels by tens.
    for a, b in zip(result.outputs["img"]["output"], plain.outputs["img"]["output"], strict=True):
        diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16))
        assert diff.max() <= 6 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_an_unfused_lora_on_the_modulation_layers_is_computed_through_and_follows_its_scale(monkeypatch):
    from peft import LoraConfig

    monkeypatch.setenv("FLUXKILN_CUDA_GRAPHS", "0")
    pipe = build_tiny_flux("dev")
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=[
        "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "to_q"]), adapter_name="mod")
    want = {scale: None for scale in (1.0, 0.5)}
    for scale in want:
        pipe.transformer.set_adapters(["mod"], weights=[scale])
        want[scale] = images(pipe, "a red fox", 1)
    assert np.abs(want[1.0] - want[0.5]).max() > 1e-3  # the adapter changes the picture
    graphed.install(pipe.transformer)
    assert modulation.install(pipe.transformer) == 2 * 1 + 2 + 1
    for scale in (1.0, 0.5):  # a new scale between calls: the next call's table is computed with it
        pipe.transformer.set_adapters(["mod"], weights=[scale])
        with modulation.steps(pipe):
            np.testing.assert_allclose(images(pipe, "a red fox", 1), want[scale], atol=1e-5, err_msg=str(scale))
    modulation.remove(pipe.transformer)
    assert type(pipe.transformer.norm_out.linear).__module__.startswith("peft")
