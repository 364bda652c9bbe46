"""Images leave the pipeline as tensors and become PIL images exactly as diffusers' own conversion makes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from fluxkiln.plugins.flux.generate import to_pil


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_pil_equals_diffusers_pil_output_to_the_last_bit(dtype):
    images = torch.rand(3, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    # values that sit exactly between two levels: both must round half to even
    images[0, 0, 0, :6] = torch.tensor([0.5, 1.5, 2.5, 254.5, 0.0, 255.0]) / 255
    images = images.to(dtype)
    expected = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    got = to_pil(images)
    assert [im.size for im in got] == [(24, 40)] * 3 and {im.mode for im in got} == {"RGB"}
    for a, b in zip(expected, got, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_to_pil_keeps_one_channel_images_grey():
    got = to_pil(torch.full((1, 1, 4, 4), 0.5))
    assert got[0].mode == "L" and np.asarray(got[0]).tolist() == [[128] * 4] * 4
