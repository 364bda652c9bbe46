"""The `caption` node through the Engine: which images get captions, exact text rules, editable files."""

from __future__ import annotations

import json
import shutil

import pytest

from fluxkiln.plugins.caption.store import MANIFEST, edited_captions_fingerprint
from fluxkiln.plugins.caption.text import apply_trigger, compose_generated

from test_caption_helpers import caption_recipe, engine, failure, logs, make_images, write_recipe

DATA = {"a": ((200, 10, 10), "a kept caption"), "b": ((10, 200, 10), None), "c": ((10, 10, 200), None)}


def recipe(tmp_path, **params):
    params.setdefault("model", "builtin:tiny-captioner")
    params.setdefault("max_length", 16)
    return caption_recipe(tmp_path, **params)


def captions(result):
    return {it.name: it.caption for it in result.outputs["cap"]["output"].items}


def manifest_raw(tmp_path, stem, run="t"):
    entries = json.loads((tmp_path / "runs" / run / "cap" / MANIFEST).read_text())["entries"]
    return entries[stem]["raw"]


@pytest.fixture
def setup(tmp_path):
    make_images(tmp_path / "data", DATA)
    return tmp_path, engine(tmp_path)


def run(eng, path, tmp_path, **kw):
    result = eng.run(path, output=tmp_path / "runs" / "t", **kw)
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    return result


@pytest.mark.parametrize(("raw", "prefix", "suffix", "want"), [
    ("a cat", "", "", "a cat"),
    (" a cat ", "a photo of TOK,", ", 4k", "a photo of TOK, a cat, 4k"),
    ("a cat", "a photo of TOK, ", " in the snow", "a photo of TOK, a cat in the snow"),
    ("a cat", "", ". high quality", "a cat. high quality"),
    ("", "style of TOK", "", "style of TOK"),
    ("", "", ", 4k", "4k"),
])
def test_prefix_suffix_joining_rules(raw, prefix, suffix, want):
    assert compose_generated(raw, prefix, suffix) == want


@pytest.mark.parametrize(("caption", "placement", "want"), [
    ("a cat", "prefix", "TOK, a cat"),
    ("a cat.", "suffix", "a cat, TOK"),
    ("a cat", "none", "a cat"),
    ("a TOK cat", "prefix", "a TOK cat"),
    ("a TOKEN cat", "prefix", "TOK, a TOKEN cat"),
    ("a [trigger] cat", "suffix", "a TOK cat"),
    ("a [trigger] cat", "none", "a TOK cat"),
    ("", "prefix", "TOK"),
])
def test_trigger_placement_rules(caption, placement, want):
    assert apply_trigger(caption, "TOK", placement) == want


def test_only_uncaptioned_images_get_generated_captions_with_exact_wrapping(setup):
    tmp_path, eng = setup
    result = run(eng, recipe(tmp_path, prefix="a photo of TOK,", suffix=", 4k", trigger_word="TOK"), tmp_path)
    caps = captions(result)
    assert caps["a.png"] == "TOK, a kept caption"  # kept, trigger added, no prefix/suffix
    for stem in ("b", "c"):
        raw = manifest_raw(tmp_path, stem)
        assert raw and raw == raw.strip()
        assert caps[f"{stem}.png"] == f"a photo of TOK, {raw}, 4k"  # TOK already present: not added again
    folder = tmp_path / "runs" / "t" / "cap"
    for name, text in caps.items():
        assert (folder / name.replace(".png", ".txt")).read_text() == text + "\n"
    progress = [e.data for e in result.events if e.event == "node_progress" and e.node == "cap"]
    assert progress[-1]["step"] == progress[-1]["total"] == 3 and len(progress) >= 3
    assert any("captioning 2 image(s)" in m and "(blip," in m for m in logs(result, "cap"))
    report = json.loads((folder / "captions.json").read_text())
    assert [r["source"] for r in report] == ["dataset", "generated", "generated"]


def test_overwrite_captions_every_image_and_suffix_trigger(setup):
    tmp_path, eng = setup
    result = run(eng, recipe(tmp_path, overwrite=True, trigger_word="zxq", trigger_placement="suffix"), tmp_path)
    caps = captions(result)
    for stem in "abc":
        assert caps[f"{stem}.png"] == f"{manifest_raw(tmp_path, stem).rstrip(' .,')}, zxq"
    assert "kept" not in caps["a.png"]


def test_changing_prefix_reuses_raw_captions_without_the_model(setup):
    tmp_path, eng = setup
    run(eng, recipe(tmp_path, prefix="one"), tmp_path)
    raw_b = manifest_raw(tmp_path, "b")
    result = run(eng, recipe(tmp_path, prefix="two"), tmp_path)
    assert result.nodes["cap"] == "ran"
    assert captions(result)["b.png"] == f"two {raw_b}"
    assert not any("captioning" in m for m in logs(result, "cap"))


def test_edited_caption_file_wins_verbatim_and_survives_reruns(setup):
    tmp_path, eng = setup
    path = recipe(tmp_path, prefix="p", trigger_word="TOK")
    run(eng, path, tmp_path)
    edited = tmp_path / "runs" / "t" / "cap" / "b.txt"
    edited.write_text("my own words for b\n")
    result = run(eng, path, tmp_path, force=["cap"])
    caps = captions(result)
    assert caps["b.png"] == "my own words for b"  # verbatim: no prefix, no trigger
    assert caps["c.png"].startswith("TOK, p ")
    assert edited.read_text() == "my own words for b\n"
    result = run(eng, recipe(tmp_path, prefix="q", trigger_word="TOK"), tmp_path)
    assert captions(result)["b.png"] == "my own words for b"
    edited.unlink()  # deleting the edit hands the file back to the node
    result = run(eng, recipe(tmp_path, prefix="p", trigger_word="TOK"), tmp_path, force=["cap"])
    assert captions(result)["b.png"] == f"TOK, p {manifest_raw(tmp_path, 'b')}"


def test_edited_files_fingerprint_ignores_the_nodes_own_writes(setup):
    tmp_path, eng = setup
    folder = tmp_path / "runs" / "t" / "cap"
    assert edited_captions_fingerprint({}, folder) == ""
    run(eng, recipe(tmp_path), tmp_path)
    assert edited_captions_fingerprint({}, folder) == ""  # files the node wrote are not edits
    (folder / "c.txt").write_text("edited c")
    first = edited_captions_fingerprint({}, folder)
    assert first
    (folder / "c.txt").write_text("edited c again")
    assert edited_captions_fingerprint({}, folder) not in ("", first)
    (folder / "new.txt").write_text("added by hand")
    assert edited_captions_fingerprint({"captions_dir": str(folder)}, tmp_path / "elsewhere") != ""


@pytest.mark.parametrize("where", [None, "captions"])
def test_editing_a_caption_file_reruns_the_node_through_the_engine(setup, where):
    tmp_path, eng = setup
    path = recipe(tmp_path, **({"captions_dir": where} if where else {}))
    run(eng, path, tmp_path)
    assert run(eng, path, tmp_path).nodes["cap"] == "cached"
    folder = tmp_path / where if where else tmp_path / "runs" / "t" / "cap"
    (folder / "c.txt").write_text("hand written")
    result = run(eng, path, tmp_path)
    assert result.nodes["cap"] == "ran" and captions(result)["c.png"] == "hand written"
    started = [e.data["reason"] for e in result.events if e.event == "node_started" and e.node == "cap"]
    assert "edited" in started[0]
    assert run(eng, path, tmp_path).nodes["cap"] == "cached"
    assert run(engine(tmp_path), path, tmp_path).nodes["cap"] == "cached"  # a new process agrees


def test_captions_dir_relative_to_recipe_holds_the_files(setup):
    tmp_path, eng = setup
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "c.txt").write_text("prepared by the user")
    result = run(eng, recipe(tmp_path, captions_dir="captions"), tmp_path)
    assert captions(result)["c.png"] == "prepared by the user"
    assert (tmp_path / "captions" / "b.txt").read_text().strip() == captions(result)["b.png"]
    assert not (tmp_path / "runs" / "t" / "cap" / "b.txt").exists()


def test_no_model_is_loaded_when_every_image_has_a_caption(tmp_path):
    make_images(tmp_path / "data", {"a": ((1, 2, 3), "first"), "b": ((4, 5, 6), "second")})
    eng = engine(tmp_path)
    result = run(eng, recipe(tmp_path, model="acme/not-downloaded"), tmp_path)
    assert captions(result) == {"a.png": "first", "b.png": "second"}
    assert eng.models.keys() == []


def test_captioner_is_held_by_residency_as_kind_captioner(setup):
    tmp_path, eng = setup
    run(eng, recipe(tmp_path), tmp_path)
    keys = [r for r in eng.models.describe() if r["key"].startswith("captioner:")]
    assert len(keys) == 1 and keys[0]["kind"] == "captioner" and keys[0]["size"] > 0
    assert eng.models.release_kind("captioner") == [keys[0]["key"]]
    assert eng.models.keys() == []


def test_missing_hub_model_fails_with_how_to_fetch_it(setup):
    tmp_path, eng = setup
    result = eng.run(recipe(tmp_path, model="acme/not-downloaded"), output=tmp_path / "runs" / "t")
    info = failure(result, "cap")
    assert "acme/not-downloaded" in info["error"] and "not in the local Hugging Face cache" in info["error"]
    assert "huggingface-cli download acme/not-downloaded" in info["hint"] and info["key"] == "model"


def test_missing_local_folder_is_reported(setup):
    tmp_path, eng = setup
    result = eng.run(recipe(tmp_path, model="models/nope"), output=tmp_path / "runs" / "t")
    assert "no folder" in failure(result, "cap")["error"] and str(tmp_path / "models" / "nope") in \
        failure(result, "cap")["error"]
    result = eng.run(recipe(tmp_path, model="./models/nope"), output=tmp_path / "runs" / "t")
    assert "neither a folder" in failure(result, "cap")["error"]


def test_non_captioner_model_is_refused_by_its_config(setup, tmp_path):
    tmp_path, eng = setup
    folder = tmp_path / "models" / "blip-captioner-large"  # the name says captioner; the config does not
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    result = eng.run(recipe(tmp_path, model="models/blip-captioner-large"), output=tmp_path / "runs" / "t")
    assert "not an image captioner" in failure(result, "cap")["error"]


def test_remote_code_florence_checkpoint_is_refused_with_the_native_alternative(setup):
    tmp_path, eng = setup
    folder = tmp_path / "models" / "f2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "florence2", "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"},
        "vision_config": {"model_type": "davit"}}))
    info = failure(eng.run(recipe(tmp_path, model="models/f2"), output=tmp_path / "runs" / "t"), "cap")
    assert "remote-code" in info["error"] and "florence-community/Florence-2-large" in info["hint"]


def test_cancelled_run_stops_captioning(setup, monkeypatch):
    tmp_path, eng = setup
    from fluxkiln.engine.context import RunContext

    monkeypatch.setattr(RunContext, "check_cancelled", lambda self: (_ for _ in ()).throw(
        __import__("fluxkiln.engine", fromlist=["Cancelled"]).Cancelled("stop")))
    result = eng.run(recipe(tmp_path), output=tmp_path / "runs" / "t")
    assert result.status == "cancelled" and result.nodes["cap"] == "cancelled"


def test_local_copy_loads_like_the_builtin(setup):
    tmp_path, eng = setup
    from fluxkiln.plugins.caption.tiny import tiny_captioner_path

    shutil.copytree(tiny_captioner_path("tiny-captioner"), tmp_path / "models" / "my-florence")
    a = captions(run(eng, recipe(tmp_path, model="models/my-florence", overwrite=True), tmp_path))
    b = captions(run(engine(tmp_path), recipe(tmp_path, model="builtin:tiny-captioner", overwrite=True), tmp_path))
    assert a == b


def test_cli_run_with_the_dataset_node_streams_caption_events(tmp_path, capsys):
    from fluxkiln.engine.cli import main

    make_images(tmp_path / "data", DATA)
    path = write_recipe(tmp_path, """
        [nodes.data]
        type = "dataset"
        source = "data"

        [nodes.cap]
        type = "caption"
        dataset = "@data"
        model = "builtin:tiny-captioner"
        max_length = 8
        trigger_word = "TOK"
        """)
    assert main(["run", str(path), "--json", "--output", str(tmp_path / "out")]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = [e["step"] for e in events if e["event"] == "node_progress" and e["node"] == "cap"]
    assert steps[-1] == 3
    assert (tmp_path / "out" / "cap" / "a.txt").read_text() == "TOK, a kept caption\n"
    assert (tmp_path / "out" / "cap" / "b.txt").read_text().startswith("TOK, ")
    assert main(["run", str(path), "--json", "--output", str(tmp_path / "out")]) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["source"] for e in again if e["event"] == "node_cached" and e["node"] == "cap"] == ["disk"]


def test_cached_captions_in_a_new_folder_stay_the_nodes_own(setup):
    tmp_path, eng = setup
    path = recipe(tmp_path, trigger_word="TOK")
    first = run(eng, path, tmp_path)
    for _ in range(2):  # into a new folder: the files come from the cache, and stay cached next time
        again = eng.__class__(eng.registry, cache_dir=eng.cache_root).run(path, output=tmp_path / "elsewhere")
        assert again.ok and again.nodes["cap"] == "cached", again.nodes
    folder = tmp_path / "elsewhere" / "cap"
    assert {p.name for p in folder.glob("*.txt")} == {"a.txt", "b.txt", "c.txt"}
    assert edited_captions_fingerprint({}, folder) == ""  # not mistaken for the user's edits
    assert captions(again) == captions(first)
