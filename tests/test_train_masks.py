"""train_lora's masked loss (``mask_path``, ``mask_min_value``): each packed latent token's squared error weighs
as the mask's brightness over its pixels says; masks are matched to images by file name; bad masks fail
clearly, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_support import failure, run, solid_dataset, write_recipe


def _masks(folder: Path, names: list[str], size: int = 64) -> Path:
    """Masks white on the top half, black below."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        im = Image.new("L", (size, size), 0)
        im.paste(255, (0, 0, size, size // 2))
        im.save(folder / f"{name}.png")
    return folder


def _recorded_weights(monkeypatch) -> list:
    from fluxkiln.plugins.train import loop

    seen, loss = [], loop.flow_loss

    def recorded(*args, **kwargs):
        seen.append(kwargs.get("token_weights"))
        return loss(*args, **kwargs)

    monkeypatch.setattr(loop, "flow_loss", recorded)
    return seen


@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_each_token_weighs_as_its_part_of_the_mask(tmp_path, monkeypatch, floor):
    seen = _recorded_weights(monkeypatch)
    data = solid_dataset(tmp_path / "data", n=4)
    masks = _masks(tmp_path / "masks", [f"img{i}" for i in range(4)])
    result = run(write_recipe(tmp_path / "r.toml", data, steps=3, batch_size=2, mask_path=str(masks),
                              mask_min_value=floor), tmp_path / "cache", tmp_path / "run")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    assert len(seen) == 3 and all(w is not None and w.shape[0] == 2 for w in seen), seen
    rows = seen[0][0].view(-1, int(seen[0].shape[1] ** 0.5))  # the packed tokens as a square grid
    half = rows.shape[0] // 2
    assert torch.allclose(rows[:half], torch.ones_like(rows[:half]))  # the white top trains at full weight
    assert torch.allclose(rows[half:], torch.full_like(rows[half:], floor))  # the black bottom at the floor


def test_without_masks_the_loss_is_unweighted(tmp_path, monkeypatch):
    seen = _recorded_weights(monkeypatch)
    data = solid_dataset(tmp_path / "data", n=2)
    assert run(write_recipe(tmp_path / "r.toml", data, steps=3), tmp_path / "cache", tmp_path / "run").ok
    assert seen == [None, None, None]


def test_the_weighted_loss_is_the_mean_over_the_weighted_tokens():
    from fluxkiln.plugins.train.flow import flow_loss

    torch.manual_seed(0)
    latents = torch.randn(2, 4, 4, 4)  # 2 x 2 packed tokens each

    class Model(torch.nn.Module):  # a stand-in transformer: the prediction is the noisy input itself
        config = type("Config", (), {"guidance_embeds": False})()

        def forward(self, hidden_states, **_kwargs):
            return (hidden_states * 2,)

    def loss(weights):
        return flow_loss(Model(), latents, torch.zeros(2, 3, 8), torch.zeros(2, 8), torch.Generator().manual_seed(1),
                         "linear", "cpu", torch.float32, token_weights=weights)

    plain = loss(None)
    assert torch.allclose(loss(torch.ones(2, 4)), plain)
    assert torch.allclose(loss(torch.full((2, 4), 0.3)), plain)  # a weighted mean: the scale cancels
    one = torch.zeros(2, 4)
    one[1, 2] = 1.0
    only = loss(one)
    assert not torch.allclose(only, plain) and float(only) > 0
    assert float(loss(torch.zeros(2, 4))) == 0.0  # nothing weighted: no signal, not 0 / 0


def test_a_missing_mask_fails_naming_the_image_and_the_key(tmp_path):
    data = solid_dataset(tmp_path / "data", n=3)
    masks = _masks(tmp_path / "masks", ["img0", "img1"])
    info = failure(run(write_recipe(tmp_path / "r.toml", data, steps=3, mask_path=str(masks)), tmp_path / "cache",
                       tmp_path / "run"))
    assert info["key"] == "mask_path" and "img2.png" in info["error"] and "img2.png" in info["hint"], info


def test_an_unreadable_mask_fails_naming_it(tmp_path):
    data = solid_dataset(tmp_path / "data", n=2)
    masks = _masks(tmp_path / "masks", ["img0"])
    (masks / "img1.png").write_bytes(b"not a picture")
    info = failure(run(write_recipe(tmp_path / "r.toml", data, steps=3, mask_path=str(masks)), tmp_path / "cache",
                       tmp_path / "run"))
    assert info["key"] == "mask_path" and "img1.png" in info["error"] and info.get("hint"), info


def test_a_file_as_the_mask_folder_fails_naming_the_key(tmp_path):
    data = solid_dataset(tmp_path / "data", n=2)
    single = _masks(tmp_path / "masks", ["img0"]) / "img0.png"
    info = failure(run(write_recipe(tmp_path / "r.toml", data, steps=3, mask_path=str(single)), tmp_path / "cache",
                       tmp_path / "run"))
    assert info["key"] == "mask_path" and "not a folder" in info["error"] and info.get("hint"), info


def test_a_floor_without_masks_fails_naming_the_key(tmp_path):
    data = solid_dataset(tmp_path / "data", n=2)
    info = failure(run(write_recipe(tmp_path / "r.toml", data, steps=3, mask_min_value=0.3), tmp_path / "cache",
                       tmp_path / "run"))
    assert info["key"] == "mask_min_value" and "mask_path" in info["hint"], info


def test_a_mask_folder_that_does_not_exist_is_refused_before_the_run(tmp_path):
    from fluxkiln.engine.errors import RecipeInvalid

    data = solid_dataset(tmp_path / "data", n=2)
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3, mask_path=str(tmp_path / "nowhere"))
    with pytest.raises(RecipeInvalid) as info:
        run(recipe, tmp_path / "cache", tmp_path / "run")
    assert any(p.key == "mask_path" for p in info.value.problems), info.value.problems
