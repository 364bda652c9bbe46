"""A run folder always holds every output of its recipe, cached or not, and only links inside itself."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from clihelp import events, fluxkiln
from fluxkiln.engine.imagemeta import read_metadata
from helpers.recipes import IMAGE_PLUGINS, checked_and_saved, node, recipe_text

PLUGINS = IMAGE_PLUGINS
RECIPE = recipe_text("rf", node("gen", "fake_image", prompt="a gradient", seed=1, num_outputs=2),
                     checked_and_saved(output_format="png"), node("stats", "stats", images="@gen"))
FILES = ("saved_0.png", "saved_1.png", "checked/check.json", "stats/stats.json")


@pytest.fixture
def proj(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    return tmp_path


def run(proj, cache, *args, recipe="r.toml"):
    res = fluxkiln("run", recipe, "--json", *args, cwd=proj, cache=cache, **PLUGINS)
    assert res.returncode == 0, res.stderr
    evs = events(res.stdout)
    return evs, {e["node"]: e for e in evs if e["event"] in ("node_started", "node_cached")}


def states(evs):
    return evs[-1]["nodes"]


def same_files(a, b):
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in FILES)


def test_output_dir_of_a_cached_run_gets_every_file_and_links_only_inside(proj, fresh_cache):
    run(proj, fresh_cache)
    first = proj / "runs" / "rf"
    evs, by_node = run(proj, fresh_cache, "--output", "new")
    new = proj / "new"
    assert set(states(evs).values()) == {"cached"}
    assert same_files(first, new) and not any((new / f).is_symlink() for f in FILES)
    assert by_node["saved"]["artifacts"] == [str(new / "saved_0.png"), str(new / "saved_1.png")]
    assert by_node["stats"]["artifacts"] == [str(new / "stats" / "stats.json")]
    report = (new / "report.md").read_text()
    assert "../" not in report and "![saved_0.png](saved_0.png)" in report and "(checked/check.json)" in report
    assert all(a.startswith(str(new)) for r in json.loads((new / "report.json").read_text())["nodes"]
               for a in r["artifacts"])
    saved = {f: (new / f).read_bytes() for f in FILES}
    shutil.rmtree(first)  # nothing in the new folder depends on the first one
    assert {f: (new / f).read_bytes() for f in FILES} == saved


def test_renamed_and_copied_recipes_get_their_files(proj, fresh_cache):
    run(proj, fresh_cache)
    evs, _ = run(proj, fresh_cache, "--set", 'recipe.name="other"')
    assert set(states(evs).values()) == {"cached"} and same_files(proj / "runs" / "rf", proj / "runs" / "other")
    (proj / "copy.toml").write_text(RECIPE.replace('name = "rf"', 'name = "copied"'))
    evs, _ = run(proj, fresh_cache, recipe="copy.toml")
    assert set(states(evs).values()) == {"cached"} and same_files(proj / "runs" / "rf", proj / "runs" / "copied")


def test_seed_a_then_b_then_a_leaves_the_seed_a_image(proj, fresh_cache):
    image = proj / "runs" / "rf" / "saved_0.png"
    run(proj, fresh_cache)
    seed_1 = image.read_bytes()
    run(proj, fresh_cache, "--set", "nodes.gen.seed=7")
    assert image.read_bytes() != seed_1 and read_metadata(image)["seed"] == 7
    evs, by_node = run(proj, fresh_cache)
    assert states(evs)["saved"] == "cached" and by_node["saved"]["source"] == "disk"
    assert image.read_bytes() == seed_1 and read_metadata(image)["seed"] == 1
    assert json.loads((proj / "runs" / "rf" / "checked" / "check.json").read_text())["seeds"] == [1, 2]


def test_recipe_written_by_inspect_gets_the_image_in_its_own_folder(proj, fresh_cache):
    (proj / "r.toml").write_text(RECIPE.replace("num_outputs = 2", "num_outputs = 1"))
    run(proj, fresh_cache)
    original = proj / "runs" / "rf" / "saved_0.png"
    res = fluxkiln("inspect", str(original), "--write-recipe", "again.toml", cwd=proj, cache=fresh_cache, **PLUGINS)
    assert res.returncode == 0, res.stderr
    evs, _ = run(proj, fresh_cache, "--output", "again", recipe="again.toml")
    assert states(evs)["saved"] == "cached"
    from PIL import Image

    with Image.open(original) as a, Image.open(proj / "again" / "saved_0.png") as b:
        assert a.tobytes() == b.tobytes()


def test_node_without_outputs_is_cached_on_disk_with_its_file_and_true_reasons(proj, fresh_cache):
    run(proj, fresh_cache)
    evs, by_node = run(proj, fresh_cache, "--output", "second")
    assert states(evs)["stats"] == "cached" and by_node["stats"]["source"] == "disk"
    assert json.loads((proj / "second" / "stats" / "stats.json").read_text())[0]["seed"] == 1
    evs, by_node = run(proj, fresh_cache, "--set", 'nodes.stats.label="more"')
    assert by_node["stats"]["reason"] == "param 'label' changed 'stats' -> 'more'"
    assert (proj / "runs" / "rf" / "stats" / "more.json").is_file()


def test_a_forced_rerun_never_writes_through_a_shared_file(proj, fresh_cache):
    (proj / "r.toml").write_text(RECIPE.replace('images = "@gen"\n', 'images = "@gen"\npad = 100000\n', 1))
    run(proj, fresh_cache)
    run(proj, fresh_cache, "--output", "b")
    run(proj, fresh_cache, "--output", "c")
    report = proj / "c" / "checked" / "check.json"
    before = report.read_bytes()
    assert report.stat().st_nlink > 1  # shared with the cache and folder b
    (proj / "b" / "checked" / "check.json").chmod(0o644)  # even a writable shared file is not written through
    evs, by_node = run(proj, fresh_cache, "--output", "b", "--force", "checked")
    assert by_node["checked"]["reason"] == "forced"
    assert report.read_bytes() == before  # folder c and the cache keep their copy
    evs, _ = run(proj, fresh_cache, "--output", "d")
    assert set(states(evs).values()) == {"cached"} and same_files(proj / "b", proj / "d")


def test_files_from_the_cache_are_read_only_hard_links_or_copies(proj, fresh_cache, monkeypatch):
    from fluxkiln.engine.registry import Registry
    from fluxkiln.engine.runner import Engine
    from helpers import imagenodes, textnodes

    (proj / "r.toml").write_text(RECIPE.replace('images = "@gen"\n', 'images = "@gen"\npad = 100000\n', 1))
    engine = Engine(Registry.load(extra=[textnodes, imagenodes], entry_points=False), cache_dir=fresh_cache)
    assert engine.run(proj / "r.toml", output=proj / "a").ok
    assert engine.run(proj / "r.toml", output=proj / "b").ok
    linked = proj / "b" / "checked" / "check.json"
    assert linked.stat().st_size >= 16 * 1024
    assert linked.stat().st_nlink > 1 and linked.stat().st_mode & 0o222 == 0  # the cache's copy is read-only
    small = proj / "b" / "saved_0.png"  # small files are ordinary, writable copies
    assert small.stat().st_size < 16 * 1024 and small.stat().st_nlink == 1 and small.stat().st_mode & 0o200
    assert any(os.path.samefile(linked, p) for p in (fresh_cache / "blobs").rglob("*") if p.is_file())

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    assert engine.run(proj / "r.toml", output=proj / "c").ok
    copied = proj / "c" / "checked" / "check.json"
    assert copied.stat().st_nlink == 1 and copied.read_bytes() == linked.read_bytes()


def test_watch_edit_then_undo_shows_the_files_of_the_undone_recipe(tmp_path, fresh_cache):
    from test_watch import RECIPE as WATCHED
    from test_watch import Watch

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("x")
    (tmp_path / "r.toml").write_text(WATCHED.format(v="one"))
    out = tmp_path / "runs" / "w" / "b" / "out.txt"
    w = Watch(tmp_path, fresh_cache)
    try:
        w.until("watch_waiting")
        assert out.read_text() == "one+x"
        (tmp_path / "r.toml").write_text(WATCHED.format(v="two"))
        w.until("watch_waiting")
        assert out.read_text() == "two+x"
        (tmp_path / "r.toml").write_text(WATCHED.format(v="one"))
        rerun, seen = w.until("watch_rerun")
        assert rerun["cached"] and "b" in rerun["cached"] and not rerun["ran"]
        assert out.read_text() == "one+x"
    finally:
        assert w.stop() == 130
