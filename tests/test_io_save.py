"""The `save` node: formats, quality, naming, atomic writes, metadata and secrets."""

from __future__ import annotations

import pytest
from PIL import Image

from fluxkiln.engine import ImageItem, Images, NodeError
from fluxkiln.engine.imagemeta import read_metadata
from fluxkiln.plugins.io.save import save
from test_io_helpers import RECIPE, make_ctx, picture, sample_images


@pytest.mark.parametrize("fmt", ["webp", "jpg", "png"])
def test_save_writes_named_files_with_metadata(tmp_path, fmt):
    ctx, events = make_ctx(tmp_path)
    out = save(ctx, sample_images(2), output_format=fmt)
    run_dir = tmp_path / "runs" / "io-test"
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [f"saved_0.{fmt}", f"saved_1.{fmt}"]
    assert len(out) == 2 and all(type(i) is ImageItem for i in out)
    assert out[1].meta["path"] == str(run_dir / f"saved_1.{fmt}")
    assert out[1].seed == 43 and out[1].meta["params"]["seed"] == 42
    assert ctx.artifacts == [str(run_dir / f"saved_0.{fmt}"), str(run_dir / f"saved_1.{fmt}")]
    with Image.open(run_dir / f"saved_1.{fmt}") as im:
        assert im.format == {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}[fmt]
        assert im.size == (64, 48)
    meta = read_metadata(run_dir / f"saved_1.{fmt}")
    assert meta["recipe"] == RECIPE
    assert meta["seed"] == 43 and meta["index"] == 1
    assert meta["node"] == "images" and meta["node_type"] == "sample" and meta["saved_by"] == "saved"
    assert meta["params"]["num_inference_steps"] == 4
    assert meta["model"] == "builtin:tiny-flux" and meta["prompt"] == "a red fox in snow"
    assert meta["recipe_name"] == "io-test" and meta["fluxkiln_version"]
    assert any(e.event == "node_progress" for e in events)


def test_filename_prefix_and_png_is_lossless(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    img = picture(noise=True)
    save(ctx, Images([ImageItem(image=img, seed=1)]), output_format="png", output_quality=0, filename="fox")
    path = tmp_path / "runs" / "io-test" / "fox_0.png"
    with Image.open(path) as im:
        assert im.convert("RGB").tobytes() == img.tobytes()


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_quality_changes_file_size(tmp_path, fmt):
    sizes = {}
    for q in (10, 95):
        ctx, _ = make_ctx(tmp_path / f"q{q}")
        save(ctx, Images([ImageItem(image=picture(size=(128, 128), noise=True))]), output_format=fmt,
             output_quality=q)
        sizes[q] = (tmp_path / f"q{q}" / "runs" / "io-test" / f"saved_0.{fmt}").stat().st_size
    assert sizes[10] < sizes[95] * 0.7


def test_rgba_and_palette_images_save_as_jpg(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    items = [ImageItem(image=Image.new("RGBA", (8, 8), (1, 2, 3, 100))), ImageItem(image=Image.new("P", (8, 8)))]
    save(ctx, Images(items), output_format="jpg")
    assert (tmp_path / "runs" / "io-test" / "saved_1.jpg").exists()


def test_rerun_replaces_own_file_but_keeps_users_file(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    run_dir = tmp_path / "runs" / "io-test"
    save(ctx, sample_images(1), output_format="png")
    first = (run_dir / "saved_0.png").read_bytes()
    save(ctx, Images([ImageItem(image=picture((0, 255, 0)), seed=9)]), output_format="png")
    assert (run_dir / "saved_0.png").read_bytes() != first
    assert sorted(p.name for p in run_dir.iterdir()) == ["saved_0.png"]
    # a file the user put there (no fluxkiln metadata) is never overwritten
    (run_dir / "saved_0.png").unlink()
    picture((1, 2, 3)).save(run_dir / "saved_0.png")
    user_bytes = (run_dir / "saved_0.png").read_bytes()
    ctx2, events = make_ctx(tmp_path)
    out = save(ctx2, sample_images(1), output_format="png")
    assert (run_dir / "saved_0.png").read_bytes() == user_bytes
    assert out[0].meta["path"] == str(run_dir / "saved_0-2.png")
    assert read_metadata(run_dir / "saved_0-2.png")["saved_by"] == "saved"
    assert any(e.event == "node_log" and "saved_0-2.png" in e.data["message"] for e in events)
    # the next run replaces its own saved_0-2.png, still leaving the user's file alone
    save(ctx2, sample_images(1), output_format="png")
    assert sorted(p.name for p in run_dir.iterdir()) == ["saved_0-2.png", "saved_0.png"]


def test_other_node_file_is_not_replaced(tmp_path):
    ctx_a, _ = make_ctx(tmp_path, node="a")
    ctx_b, _ = make_ctx(tmp_path, node="b")
    save(ctx_a, sample_images(1), output_format="png", filename="same")
    save(ctx_b, sample_images(1), output_format="png", filename="same")
    run_dir = tmp_path / "runs" / "io-test"
    assert read_metadata(run_dir / "same_0.png")["saved_by"] == "a"
    assert read_metadata(run_dir / "same_0-2.png")["saved_by"] == "b"


def test_failure_during_save_leaves_existing_file_intact(tmp_path, monkeypatch):
    ctx, _ = make_ctx(tmp_path)
    run_dir = tmp_path / "runs" / "io-test"
    save(ctx, sample_images(1), output_format="webp")
    before = (run_dir / "saved_0.webp").read_bytes()
    real_save = Image.Image.save

    def broken_save(self, fp, format=None, **kw):  # noqa: A002 - Pillow's name
        real_save(self, fp, format=format, **kw)
        fp.truncate(10)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(NodeError, match="disk full"):
        save(ctx, Images([ImageItem(image=picture((0, 0, 255)), seed=5)]), output_format="webp")
    assert (run_dir / "saved_0.webp").read_bytes() == before
    assert [p.name for p in run_dir.iterdir()] == ["saved_0.webp"]  # no temp file left behind


def test_nsfw_flagged_images_are_saved_with_flags(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    items = sample_images(1)
    items[0].flags["nsfw"] = True
    save(ctx, items, output_format="jpg")
    assert read_metadata(tmp_path / "runs" / "io-test" / "saved_0.jpg")["flags"] == {"nsfw": True}


def test_no_secret_in_metadata(tmp_path, monkeypatch):
    sentinel = "hf_SENTINEL0123456789abcdefghijklmnop"
    other = "S3NTINEL-wandb-0123456789"
    monkeypatch.setenv("MY_HF_TOKEN", sentinel)
    monkeypatch.setenv("WANDB_API_KEY", other)
    text = RECIPE + '\n[nodes.lora]\ntype = "train_lora"\nhf_token = "$MY_HF_TOKEN"\nwandb_api_key = "' + other + '"\n'
    text += 'tokenizer = "models/tokenizer"\n'  # not a secret, kept as is
    ctx, _ = make_ctx(tmp_path, text=text, overrides=[f"nodes.lora.hf_token={sentinel}"])
    # a careless sampler that recorded resolved secrets in its meta must not leak them either
    items = sample_images(1, hf_token=sentinel)
    items[0].meta["params"]["wandb_api_key"] = other
    items[0].prompt = f"leak {sentinel}"
    for fmt in ("png", "jpg", "webp"):
        save(ctx, items, output_format=fmt)
        path = tmp_path / "runs" / "io-test" / f"saved_0.{fmt}"
        raw = path.read_bytes()
        assert b"SENTINEL" not in raw and b"S3NTINEL" not in raw
        meta = read_metadata(path)
        assert '"$MY_HF_TOKEN"' in meta["recipe"]  # the env reference itself is kept
        assert 'tokenizer = "models/tokenizer"' in meta["recipe"]
        assert meta["params"]["wandb_api_key"] == "<redacted>"
        assert meta["overrides"] == ["nodes.lora.hf_token=<redacted>"]


def test_filename_must_be_a_plain_name():
    from fluxkiln.engine.registry import Registry

    spec = Registry.load(entry_points=False).node_types["save"].params["filename"]
    assert spec.check_literal("fox.v2")[1] is None
    for bad in ("../evil", "a/b", ".hidden", ""):
        assert spec.check_literal(bad)[1], bad
