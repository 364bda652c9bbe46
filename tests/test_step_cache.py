"""The opt-in step cache (`sample`'s `cache_threshold`): nothing changes at 0, blocks are skipped above it, and
the shared pipeline is left without the cache afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from flux_support import recipe, run
from fluxkiln.engine.runner import Engine
from fluxkiln.plugins.flux.stepcache import step_cache
from helpers.recipes import load_tiny, red_cube

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BODY = "\n" + load_tiny() + red_cube(steps=8, seed=3) + "{extra}\n"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(cache_dir=tmp_path_factory.mktemp("step-cache"))


def image(engine, folder, extra: str = "", name: str = "t"):
    result = run(engine, recipe(folder, BODY.format(extra=extra), name))
    return result.outputs["img"]["output"][0]


def hooked(pipe) -> bool:
    from fluxkiln.plugins.flux.fast import blocks

    return any(getattr(b, "_diffusers_hook", None) is not None and b._diffusers_hook.hooks for b in blocks(
        pipe.transformer))


def test_threshold_zero_changes_nothing(engine, tmp_path):
    plain = image(engine, tmp_path, name="plain")
    zero = image(engine, tmp_path, "cache_threshold = 0.0", name="zero")
    assert np.array_equal(np.asarray(plain.image), np.asarray(zero.image))
    assert "cache_threshold" not in zero.meta and "cache_skipped_steps" not in zero.meta["timing"]


def test_a_high_threshold_skips_steps_and_leaves_the_shared_model_unchanged(engine, tmp_path):
    plain = image(engine, tmp_path, name="plain")
    cached = image(engine, tmp_path, "cache_threshold = 1.0", name="cached")
    timing = cached.meta["timing"]
    assert cached.meta["cache_threshold"] == 1.0
    assert timing["cache_computed_steps"] >= 1 and timing["cache_skipped_steps"] >= 1
    assert timing["cache_computed_steps"] + timing["cache_skipped_steps"] == 8
    assert not np.array_equal(np.asarray(plain.image), np.asarray(cached.image))  # lossy: reused residuals
    again = image(engine, tmp_path, name="again")
    assert np.array_equal(np.asarray(plain.image), np.asarray(again.image))  # the cache was taken off again
    (key,) = engine.models.keys()
    assert not hooked(engine.models.get(key, lambda: None))


def test_skipped_steps_do_not_run_the_remaining_blocks():
    import torch

    from fluxkiln.plugins.flux.fast import blocks
    from fluxkiln.plugins.flux.tiny import build_tiny_flux

    pipe = build_tiny_flux("dev")
    pipe.set_progress_bar_config(disable=True)
    last = blocks(pipe.transformer)[-1]
    calls = []
    inner = next(iter(last.children()))  # runs only when the block itself runs
    handle = inner.register_forward_hook(lambda *_: calls.append(1))

    def go(threshold: float):
        calls.clear()
        with step_cache(pipe.transformer, threshold) as count:
            pipe(prompt="a blue ball", width=128, height=128, num_inference_steps=6,
                 generator=torch.Generator().manual_seed(1))
        return len(calls), count

    try:
        full, none = go(0.0)
        assert full == 6 and none.computed == none.skipped == 0
        ran, count = go(1.0)
        assert count.skipped >= 1 and ran == count.computed == 6 - count.skipped
        ran, count = go(1e-9)  # any change is above a tiny threshold: every step computes
        assert ran == 6 and count.computed == 6 and count.skipped == 0
    finally:
        handle.remove()
    assert not hooked(pipe)


def test_threshold_out_of_range_is_refused(tmp_path):
    import subprocess
    import sys

    path = recipe(tmp_path, BODY.format(extra="cache_threshold = 2.0"))
    proc = subprocess.run([sys.executable, "-m", "fluxkiln", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "cache_threshold" in proc.stdout + proc.stderr
