"""Captioner families are chosen by config; hub ids, local folders and builtins load through one path."""

from __future__ import annotations

import shutil

import pytest

from fluxkiln.plugins.caption.tiny import tiny_captioner_path

from test_caption_helpers import caption_recipe, engine, failure, logs, make_images


def recipe(tmp_path, model, **params):
    return caption_recipe(tmp_path, model=model, max_length=12, batch_size=2, **params)


def run(tmp_path, model, **params):
    make_images(tmp_path / "data", {"x": ((250, 0, 0), None), "y": ((0, 0, 250), None), "z": ((9, 9, 9), None)})
    result = engine(tmp_path).run(recipe(tmp_path, model, **params), output=tmp_path / "runs" / "t")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    return result, {it.name: it.caption for it in result.outputs["cap"]["output"].items}


@pytest.mark.parametrize(("model", "family"), [
    ("builtin:tiny-captioner", "blip"),
    ("builtin:tiny-florence2", "florence2"),
    ("builtin:tiny-vlm", "generic"),
])
def test_each_family_captions_in_batches(tmp_path, model, family):
    result, caps = run(tmp_path, model, prefix="pre", suffix="post")
    assert any(f"({family}," in m for m in logs(result, "cap"))
    for text in caps.values():
        assert text.startswith("pre ") and text.endswith(" post") and len(text) > len("pre  post")


def test_florence_task_token_and_chat_prompt_are_used(tmp_path):
    _, default = run(tmp_path / "a", "builtin:tiny-florence2")
    _, other = run(tmp_path / "b", "builtin:tiny-florence2", prompt="<CAPTION>")
    assert default != other  # the task prompt reaches the model
    _, chat = run(tmp_path / "c", "builtin:tiny-vlm", prompt="What is this?")
    assert all(set(t) <= set("abcdefghijklmnopqrstuvwxyz ") for t in chat.values())  # prompt not echoed


def test_blip_prompt_is_continued(tmp_path):
    _, caps = run(tmp_path, "builtin:tiny-captioner", prompt="a photo of")
    assert all(t.startswith("a photo of") for t in caps.values())


def test_family_comes_from_config_not_folder_name(tmp_path):
    shutil.copytree(tiny_captioner_path("tiny-florence2"), tmp_path / "models" / "blip-image-captioning-large")
    result, _ = run(tmp_path, "models/blip-image-captioning-large")
    assert any("(florence2," in m for m in logs(result, "cap"))


def _fake_hub_cache(root, repo_id, src):
    """Lay a model folder out the way huggingface_hub caches a download."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_id_in_local_cache_loads_offline_through_the_same_code(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    snap = _fake_hub_cache(hub, "acme/tiny-captioner", tiny_captioner_path("tiny-captioner"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    result, from_hub = run(tmp_path / "hub-run", "acme/tiny-captioner", overwrite=True)
    eng_keys = [e.data["message"] for e in result.events if e.event == "node_log"]
    assert any("acme/tiny-captioner (blip," in m for m in eng_keys)
    _, from_folder = run(tmp_path / "folder-run", str(snap), overwrite=True)
    _, builtin = run(tmp_path / "builtin-run", "builtin:tiny-captioner", overwrite=True)
    assert from_hub == from_folder == builtin


def test_hub_id_missing_from_cache_says_how_to_fetch(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    make_images(tmp_path / "data", {"x": ((1, 1, 1), None)})
    result = engine(tmp_path).run(recipe(tmp_path, "florence-community/Florence-2-large"),
                                  output=tmp_path / "runs" / "t")
    info = failure(result, "cap")
    assert "'florence-community/Florence-2-large' is not in the local Hugging Face cache" in info["error"]
    assert "huggingface-cli download florence-community/Florence-2-large" in info["hint"]


def test_builtins_are_built_once_and_reused(tmp_path):
    first = tiny_captioner_path("tiny-captioner")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_captioner_path("tiny-captioner") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert first.name == "tiny-captioner-v1"
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tiny-captioner")]


def test_resolve_model_hook_only_claims_its_own_names():
    from fluxkiln.plugins import caption

    assert caption.resolve_model("builtin:tiny-flux") is None
    assert caption.resolve_model("acme/x") is None
    assert caption.resolve_model("builtin:tiny-captioner").endswith("tiny-captioner-v1")
