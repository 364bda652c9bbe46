"""The `safety_check` node through the Engine, on the tiny safety models whose verdicts follow colour.

Tiny models (plugins/safety/tiny.py): the checker flags red and rose, the
classifier says nsfw for red and yellow.  So red is unsafe with both stages,
rose is cleared by stage 2, yellow never reaches stage 2; grey/blue are safe.
"""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from fluxkiln.plugins.safety.tiny import tiny_safety_path

from test_caption_helpers import BLUE, GRAY, RED, ROSE, YELLOW, engine, failure, logs, write_recipe

TINY = "builtin:tiny-safety"


def recipe(tmp_path, colors, **params):
    params.setdefault("checker", TINY)
    params.setdefault("classifier", TINY)
    size = params.pop("size", 40)
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
    return write_recipe(tmp_path, f"""
        [nodes.images]
        type = "fixture_colors"
        colors = {json.dumps(colors)}
        size = {size}

        [nodes.checked]
        type = "safety_check"
        images = "@images"
        """ + extra)


def run(tmp_path, colors, eng=None, **params):
    eng = eng or engine(tmp_path)
    result = eng.run(recipe(tmp_path, colors, **params), output=tmp_path / "runs" / "t")
    return result, eng


def out_images(result):
    return result.outputs["checked"]["output"]


def report(tmp_path):
    return json.loads((tmp_path / "runs" / "t" / "checked" / "safety.json").read_text())


def test_drop_removes_only_images_both_stages_flag(tmp_path):
    result, _ = run(tmp_path, [GRAY, RED, ROSE, YELLOW, BLUE])
    assert result.ok
    assert [im.prompt for im in out_images(result)] == [GRAY, ROSE, YELLOW, BLUE]
    rep = report(tmp_path)
    assert rep["unsafe"] == [1] and rep["policy"] == "drop"
    verdicts = {r["index"]: r for r in rep["images"]}
    assert verdicts[1]["action"] == "dropped" and verdicts[1]["classifier"]["label"] == "nsfw"
    assert verdicts[2]["checker"]["flagged"] and not verdicts[2]["classifier"]["flagged"]  # rose: cleared
    assert "classifier" not in verdicts[3] and "classifier" not in verdicts[0]  # stage 2 only sees stage-1 flags
    warn = [m for m in logs(result, "checked") if "unsafe:" in m]
    assert len(warn) == 1 and warn[0].startswith("image 1 'img1' seed 1 dropped as unsafe")
    kept = out_images(result)[1]
    assert "nsfw" not in kept.flags and kept.flags["safety"]["checker"]["flagged"] is True


def test_blur_keeps_unsafe_images_blurred_and_marked(tmp_path):
    result, _ = run(tmp_path, [RED, GRAY], policy="blur", size=64)
    images = out_images(result)
    assert len(images) == 2
    red = images[0]
    assert red.flags["nsfw"]["action"] == "blurred" and red.flags["nsfw"]["unsafe"] is True
    assert red.image.size == (64, 72)
    assert "nsfw" not in images[1].flags and images[1].flags["safety"]["unsafe"] is False


def test_blur_really_blurs(tmp_path):
    from fluxkiln.plugins.safety.node import _blur

    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 32, 64))
    out = _blur(img)
    assert out.size == img.size
    edge = [out.getpixel((x, 32))[0] for x in range(24, 40)]
    assert any(20 < v < 235 for v in edge)  # hard black/white edge is smeared


def test_flag_keeps_images_untouched_with_scores(tmp_path):
    result, _ = run(tmp_path, [RED, YELLOW], policy="flag")
    images = out_images(result)
    assert [im.prompt for im in images] == [RED, YELLOW]
    nsfw = images[0].flags["nsfw"]
    assert nsfw["action"] == "flagged" and nsfw["checker"]["score"] > 0
    assert nsfw["classifier"]["nsfw_probability"] > 0.99
    assert images[0].image.getpixel((5, 5)) == (255, 0, 0)
    assert "nsfw" not in images[1].flags
    assert any("image 0 'img0' seed 0 flagged as unsafe" in m for m in logs(result, "checked"))


def test_flags_survive_the_disk_cache(tmp_path):
    run(tmp_path, [RED, GRAY], policy="flag")
    result, _ = run(tmp_path, [RED, GRAY], policy="flag")  # new engine: loaded from disk
    assert result.nodes["checked"] == "cached"
    assert out_images(result)[0].flags["nsfw"]["unsafe"] is True


def test_all_dropped_fails_clearly(tmp_path):
    result, _ = run(tmp_path, [RED, RED])
    assert result.status == "failed" and result.nodes["checked"] == "failed"
    info = failure(result, "checked")
    assert "all 2 image(s) were judged unsafe and dropped" in info["error"]
    assert "policy" in info["hint"]
    assert report(tmp_path)["unsafe"] == [0, 1]


@pytest.mark.parametrize(("params", "unsafe"), [
    ({"classifier": "none"}, [0, 1]),       # checker alone: red and rose
    ({"checker": "none"}, [0, 2]),          # classifier alone: red and yellow
    ({"checker_adjustment": -0.2}, []),     # a laxer checker flags nothing
    ({"checker_adjustment": 0.6}, [0, 2]),  # a stricter checker flags all; stage 2 still decides
    ({"checker_adjustment": 0.6, "classifier_threshold": 0.0}, [0, 1, 2, 3]),
])
def test_stages_can_be_turned_off_or_tuned(tmp_path, params, unsafe):
    result, _ = run(tmp_path, [RED, ROSE, YELLOW, GRAY], policy="flag", **params)
    assert result.ok
    assert report(tmp_path)["unsafe"] == unsafe


def test_both_stages_off_is_an_error(tmp_path):
    result, _ = run(tmp_path, [GRAY], checker="none", classifier="none")
    assert "both safety stages are turned off" in failure(result, "checked")["error"]


def test_models_held_by_residency_and_classifier_only_loaded_when_needed(tmp_path):
    result, eng = run(tmp_path, [GRAY, BLUE])
    assert result.ok
    kinds = {r["key"].split(":")[0]: r["kind"] for r in eng.models.describe()}
    assert kinds == {"safety-checker": "safety"}  # nothing flagged by stage 1: classifier never loaded
    run(tmp_path, [RED, BLUE], eng=eng, policy="flag")
    assert {r["key"].split(":")[0] for r in eng.models.describe()} == {"safety-checker", "safety-classifier"}
    assert len(eng.models.release_kind("safety")) == 2


def test_local_folders_and_pipeline_layout_load_like_builtins(tmp_path):
    root = tiny_safety_path(TINY)
    shutil.copytree(root, tmp_path / "models" / "sd-pipeline")  # safety_checker/ + feature_extractor/
    shutil.copytree(root / "nsfw_classifier", tmp_path / "models" / "clf")
    result, _ = run(tmp_path, [RED, ROSE, GRAY], policy="flag", checker="models/sd-pipeline", classifier="models/clf")
    assert result.ok and report(tmp_path)["unsafe"] == [0]


def test_hub_ids_in_cache_load_and_missing_ones_say_how_to_fetch(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from test_caption_models import _fake_hub_cache

    hub = tmp_path / "hub"
    _fake_hub_cache(hub, "acme/checker", tiny_safety_path("builtin:tiny-safety-checker"))
    _fake_hub_cache(hub, "acme/nsfw", tiny_safety_path("builtin:tiny-nsfw-classifier"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    result, _ = run(tmp_path, [RED, GRAY], policy="flag", checker="acme/checker", classifier="acme/nsfw")
    assert result.ok, failure(result, "checked")
    assert report(tmp_path)["unsafe"] == [0]
    result, _ = run(tmp_path, [RED, GRAY], checker="CompVis/stable-diffusion-safety-checker")
    info = failure(result, "checked")
    assert "not in the local Hugging Face cache" in info["error"] and info["key"] == "checker"
    assert "huggingface-cli download CompVis/stable-diffusion-safety-checker" in info["hint"]


def test_wrong_kind_of_model_is_refused(tmp_path):
    from fluxkiln.plugins.caption.tiny import tiny_captioner_path

    result, _ = run(tmp_path, [RED], checker=str(tiny_captioner_path("tiny-captioner")))
    assert "is not a Stable Diffusion safety checker" in failure(result, "checked")["error"]
    result, _ = run(tmp_path, [RED], classifier=str(tiny_safety_path("builtin:tiny-safety-checker")))
    assert "is not an image classifier" in failure(result, "checked")["error"]


def test_tiny_verdicts_follow_the_documented_colour_edges():
    from fluxkiln.plugins.safety.models import checker_scores, classifier_scores, load_checker, load_classifier

    root = tiny_safety_path(TINY)
    chk, clf = load_checker(root, "cpu"), load_classifier(root, "cpu")
    colours = [(255, 104, 104), (255, 88, 88), (255, 0, 80), (255, 0, 48), (128, 128, 128)]
    ims = [Image.new("RGB", (40, 30), c) for c in colours]
    flagged = [r["flagged"] for r in checker_scores(chk.model, chk.processor, ims, 0.0)]
    assert flagged == [False, True, True, True, False]
    assert [r["flagged"] for r in classifier_scores(clf, ims, 0.5)] == [False, False, False, True, False]


def test_checker_folder_without_preprocessor_config_uses_clip_preprocessing(tmp_path):
    folder = tmp_path / "models" / "bare-checker"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_safety_path("builtin:tiny-safety-checker") / name, folder / name)
    result, _ = run(tmp_path, [RED, GRAY], policy="flag", checker="models/bare-checker", classifier="none")
    assert result.ok, failure(result, "checked")
    assert report(tmp_path)["unsafe"] == [0]
