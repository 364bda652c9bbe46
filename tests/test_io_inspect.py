"""`fluxkiln inspect`: metadata round-trips for png/jpg/webp, --json, --write-recipe, hostile metadata."""

from __future__ import annotations

import json
import tomllib

import pytest
from PIL import Image

from fluxkiln.engine import imagemeta
from fluxkiln.engine.inspect_cmd import main
from fluxkiln.plugins.io.save import save
from test_io_helpers import RECIPE, make_ctx, picture, sample_images


def _saved(tmp_path, fmt, overrides=None, n=4):
    ctx, _ = make_ctx(tmp_path, overrides=overrides)
    out = save(ctx, sample_images(n), output_format=fmt)
    return [item.meta["path"] for item in out]


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_json_round_trip(tmp_path, capsys, fmt):
    path = _saved(tmp_path, fmt)[2]
    assert main([path, "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["format"] == imagemeta.FORMAT
    assert meta["recipe"] == RECIPE
    assert (meta["seed"], meta["index"], meta["node"]) == (44, 2, "images")
    assert meta["params"]["num_outputs"] == 4 and meta["model"] == "builtin:tiny-flux"


def test_table_output(tmp_path, capsys):
    path = _saved(tmp_path, "webp")[0]
    assert main([path, "--recipe"]) == 0
    out = capsys.readouterr().out
    for text in ("io-test", "images (sample)", "builtin:tiny-flux", "42", "a red fox in snow",
                 "num_inference_steps = 4", 'type = "load_model"'):
        assert text in out, text


def test_write_recipe_pins_this_images_seed(tmp_path, capsys):
    path = _saved(tmp_path, "png", overrides=['nodes.images.prompt="a blue fox"', "vars.steps=4"])[3]
    out = tmp_path / "again" / "repro.toml"
    assert main([path, "--write-recipe", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Reproduces saved_3.png")
    data = tomllib.loads(text)
    images = data["nodes"]["images"]
    assert images["seed"] == 45  # image 3 of a batch with seed 42 used seed 42+3
    assert images["num_outputs"] == 1
    assert images["prompt"] == "a blue fox"  # the --set override of that run is applied
    assert data["vars"]["steps"] == 4
    assert data["recipe"]["name"] == "io-test-seed45"
    assert data["nodes"]["saved"] == {"type": "save", "images": "@images"}
    err = capsys.readouterr().err
    assert "pinned nodes.images.seed = 45" in err


def test_write_recipe_refuses_to_overwrite(tmp_path, capsys):
    path = _saved(tmp_path, "jpg", n=1)[0]
    out = tmp_path / "repro.toml"
    out.write_text("mine")
    assert main([path, "--write-recipe", str(out)]) == 2
    assert out.read_text() == "mine"
    assert "--force" in capsys.readouterr().err
    assert main([path, "--write-recipe", str(out), "--force"]) == 0
    assert tomllib.loads(out.read_text())["nodes"]["images"]["seed"] == 42


def test_image_without_metadata(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    picture().save(plain)
    assert main([str(plain)]) == 1
    assert "no fluxkiln metadata" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.png")]) == 2
    (tmp_path / "text.png").write_text("not an image")
    assert main([str(tmp_path / "text.png")]) == 2
    assert main([]) == 2  # usage error from argparse


def test_hostile_metadata_is_escaped_and_capped(tmp_path, capsys):
    payload = {"format": imagemeta.FORMAT, "recipe_name": "[bold red]x[/] \x1b[2J\x1b]0;pwned\x07",
               "prompt": "p" * 50_000, "node": "[link=file:///etc/passwd]click[/link]", "seed": 1}
    path = tmp_path / "evil.png"
    imagemeta.write_image(picture(), path, "png", payload)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J" in out
    assert "[bold red]x[/]" in out  # printed literally, not as markup
    assert "[link=file:///etc/passwd]click[/link]" in out
    assert out.count("p") < 1100 and "characters)" in out
    assert main([str(path), "--json"]) == 0
    assert "\x1b" not in capsys.readouterr().out


def test_malformed_metadata(tmp_path, capsys):
    from PIL.PngImagePlugin import PngInfo

    for i, raw in enumerate(["{not json", "[1, 2]", '{"no": "format"}']):
        info = PngInfo()
        info.add_itxt("fluxkiln", raw)
        path = tmp_path / f"bad{i}.png"
        picture().save(path, pnginfo=info)
        assert main([str(path)]) == 1
        assert "error:" in capsys.readouterr().err


def test_compressed_bomb_in_xmp_is_refused(tmp_path):
    import base64
    import zlib

    z = base64.b64encode(zlib.compress(b"{" + b" " * (imagemeta.MAX_PAYLOAD * 4) + b"}")).decode()
    xmp = f"<x><fluxkiln:payload_zb64>{z}</fluxkiln:payload_zb64></x>".encode()
    path = tmp_path / "bomb.webp"
    picture().save(path, format="WEBP", xmp=xmp)
    with pytest.raises(imagemeta.MetadataError, match="larger than"):
        imagemeta.read_metadata(path)


def test_large_recipe_is_compressed_in_jpeg(tmp_path):
    recipe = RECIPE + "".join(f'\n[nodes.n{i}]\ntype = "sample"\nprompt = "prompt number {i} of many"\n'
                              for i in range(2500))
    assert len(recipe) > 65_000
    payload = imagemeta.build_payload(recipe_text=recipe, seed=3)
    path = tmp_path / "big.jpg"
    imagemeta.write_image(picture(), path, "jpg", payload)
    with Image.open(path) as im:
        assert b"payload_zb64" in im.info["xmp"]
    assert imagemeta.read_metadata(path)["recipe"] == recipe


def test_written_recipe_has_no_secret(tmp_path, monkeypatch, capsys):
    sentinel = "hf_SENTINEL0123456789abcdefghijklmnop"
    monkeypatch.setenv("HF_TOKEN", sentinel)
    text = RECIPE + f'\n[nodes.up]\ntype = "train_lora"\nhf_token = "{sentinel}"\nwandb_api_key = "$WANDB_API_KEY"\n'
    ctx, _ = make_ctx(tmp_path, text=text)
    path = save(ctx, sample_images(1), output_format="webp")[0].meta["path"]
    out = tmp_path / "repro.toml"
    assert main([path, "--write-recipe", str(out), "--full"]) == 0
    written = out.read_text()
    assert "SENTINEL" not in written and "<redacted>" not in written
    up = tomllib.loads(written)["nodes"]["up"]
    assert up == {"type": "train_lora", "wandb_api_key": "$WANDB_API_KEY"}
    assert "removed redacted secret nodes.up.hf_token" in capsys.readouterr().err
