"""Incremental reruns: fingerprints, disk and memory caches, reasons, --force, --explain, cache command."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from clihelp import events, fluxkiln
from fluxkiln.engine import devmode
from fluxkiln.engine.fingerprint import FileHasher, canonical, diff_reasons, digest, identity
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine
from helpers import textnodes
from helpers.recipes import CONST_HI, node, recipe_text

RECIPE = recipe_text("inc", node("src", "read_file", path="data.txt"), CONST_HI,
                     node("b", "concat", left="@a", right="@src"), node("c", "concat", left="@b"))


@pytest.fixture
def proj(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    (tmp_path / "data.txt").write_text("file")
    return tmp_path


@pytest.fixture
def engine(fresh_cache):
    return Engine(Registry.load(extra=[textnodes], entry_points=False), cache_dir=fresh_cache)


def started(result):
    return {e.node: e.data["reason"] for e in result.events if e.event == "node_started"}


def cached(result):
    return {e.node: e.data["source"] for e in result.events if e.event == "node_cached"}


def test_unchanged_recipe_in_new_process_is_all_cached_from_disk(proj, fresh_cache):
    first = events(fluxkiln("run", "r.toml", "--json", cwd=proj, cache=fresh_cache).stdout)
    assert set(first[-1]["nodes"].values()) == {"ran"}
    second = events(fluxkiln("run", "r.toml", "--json", cwd=proj, cache=fresh_cache).stdout)
    assert second[-1]["nodes"] == {"src": "cached", "a": "cached", "b": "cached", "c": "cached"}
    assert {e["node"]: e["source"] for e in second if e["event"] == "node_cached"} == dict.fromkeys("abc", "disk") | {"src": "disk"}
    assert not [e for e in second if e["event"] == "node_started"]


def test_same_process_reuses_memory(proj, engine):
    engine.run(proj / "r.toml", output=proj / "out")
    again = engine.run(proj / "r.toml", output=proj / "out")
    assert cached(again) == {"src": "memory", "a": "memory", "b": "memory", "c": "memory"}


def test_param_change_reruns_only_node_and_dependants_with_reasons(proj, engine):
    engine.run(proj / "r.toml", output=proj / "out")
    textnodes.CALLS.clear()
    res = engine.run(proj / "r.toml", overrides=['nodes.a.value="yo"'], output=proj / "out")
    assert started(res) == {"a": "param 'value' changed 'hi' -> 'yo'", "b": "input 'left' changed",
                            "c": "input 'left' changed"}
    assert textnodes.CALLS == ["a", "b", "c"] and res.nodes["src"] == "cached"
    assert res.outputs["c"]["output"] == "yo+file"


def test_file_content_change_reruns_reader(proj, engine):
    engine.run(proj / "r.toml", output=proj / "out")
    (proj / "data.txt").write_text("edited!")
    res = engine.run(proj / "r.toml", output=proj / "out")
    assert started(res)["src"] == "file 'data.txt' changed" and set(started(res)) == {"src", "b", "c"}
    assert res.outputs["c"]["output"] == "hi+edited!"


def test_renaming_node_ids_and_reordering_tables_reruns_nothing(proj, engine):
    engine.run(proj / "r.toml", output=proj / "out")
    renamed = RECIPE.replace("nodes.a]", "nodes.alpha]").replace('"@a"', '"@alpha"')
    reordered = renamed.split("[nodes.c]")
    (proj / "r2.toml").write_text(reordered[0].replace("[nodes.src]", "[nodes.c]" + reordered[1] + "[nodes.src]"))
    res = Engine(engine.registry, cache_dir=engine.cache_root).run(proj / "r2.toml", output=proj / "out")
    assert res.nodes == {"src": "cached", "alpha": "cached", "b": "cached", "c": "cached"}
    assert set(cached(res).values()) == {"disk"}


def test_corrupted_cache_entry_is_recomputed(proj, fresh_cache):
    first = Engine(Registry.load(extra=[textnodes], entry_points=False), cache_dir=fresh_cache)
    first.run(proj / "r.toml", output=proj / "out")
    values = list((fresh_cache / "results").glob("*/*/output/value.json"))
    assert len(values) == 4
    for v in values:
        v.write_text(v.read_text().replace("hi", "XX"))  # same size, different bytes
    res = Engine(first.registry, cache_dir=fresh_cache).run(proj / "r.toml", output=proj / "out")
    assert set(res.nodes.values()) <= {"ran"} | {"cached"} and "XX" not in res.outputs["c"]["output"]
    assert res.outputs["c"]["output"] == "hi+file"
    assert {n for n, s in res.nodes.items() if s == "ran"} >= {"a", "b", "c"}


def test_deleted_artifact_is_put_back_from_the_cache(proj, fresh_cache):
    eng = Engine(Registry.load(extra=[textnodes], entry_points=False), cache_dir=fresh_cache)
    eng.run(proj / "r.toml", output=proj / "out")
    (proj / "out" / "c" / "out.txt").unlink()
    textnodes.CALLS.clear()
    res = Engine(eng.registry, cache_dir=fresh_cache).run(proj / "r.toml", output=proj / "out")
    assert started(res) == {} and textnodes.CALLS == [] and cached(res)["c"] == "disk"
    assert (proj / "out" / "c" / "out.txt").read_text() == "hi+file"


def test_file_changed_by_the_user_is_kept_and_its_node_reruns(proj, fresh_cache):
    eng = Engine(Registry.load(extra=[textnodes], entry_points=False), cache_dir=fresh_cache)
    eng.run(proj / "r.toml", output=proj / "out")
    (proj / "out" / "c" / "out.txt").write_text("mine")
    res = Engine(eng.registry, cache_dir=fresh_cache).run(proj / "r.toml", output=proj / "out")
    assert started(res) == {"c": "'c/out.txt' in the run folder was not written by fluxkiln or was changed since, "
                                 "so it is kept and the node runs again"}


def test_force_node_reruns_it_and_dependants(proj, fresh_cache):
    fluxkiln("run", "r.toml", cwd=proj, cache=fresh_cache)
    evs = events(fluxkiln("run", "r.toml", "--json", "--force", "b", cwd=proj, cache=fresh_cache).stdout)
    reasons = {e["node"]: e["reason"] for e in evs if e["event"] == "node_started"}
    assert reasons == {"b": "forced", "c": "forced (depends on a forced node)"}
    evs = events(fluxkiln("run", "r.toml", "--json", "--force", cwd=proj, cache=fresh_cache).stdout)
    assert set(evs[-1]["nodes"].values()) == {"ran"}


def test_explain_prints_plan_without_running(proj, fresh_cache):
    fluxkiln("run", "r.toml", cwd=proj, cache=fresh_cache)
    (proj / "data.txt").write_text("changed")
    res = fluxkiln("run", "r.toml", "--explain", "--set", 'nodes.a.value="q"', cwd=proj, cache=fresh_cache)
    assert res.returncode == 0
    lines = {line.split()[0]: line for line in res.stdout.splitlines()}
    assert "run    (file 'data.txt' changed)" in lines["src"] and "param 'value' changed 'hi' -> 'q'" in lines["a"]
    plan = json.loads(fluxkiln("run", "r.toml", "--explain", "--json", cwd=proj, cache=fresh_cache).stdout)
    assert plan["src"]["action"] == "run" and plan["a"]["action"] == "cached"
    assert (proj / "data.txt").read_text() == "changed"  # nothing ran: the cache still has the old file's result
    assert plan == json.loads(fluxkiln("run", "r.toml", "--explain", "--json", cwd=proj, cache=fresh_cache).stdout)


def test_volatile_and_never_cached_nodes_always_run(proj, engine):
    (proj / "v.toml").write_text(RECIPE + node("s", "slow", text="@c", steps=1, delay=0))
    engine.run(proj / "v.toml", output=proj / "out")
    res = engine.run(proj / "v.toml", output=proj / "out")
    assert started(res) == {"s": "node type is never cached"}


def test_cache_command_lists_and_prunes(proj, fresh_cache):
    fluxkiln("run", "r.toml", cwd=proj, cache=fresh_cache)
    listing = json.loads(fluxkiln("cache", "--json", cwd=proj, cache=fresh_cache).stdout)
    assert len(listing["entries"]) == 4 and {e["type"] for e in listing["entries"]} == {"const", "concat", "read_file"}
    human = fluxkiln("cache", cwd=proj, cache=fresh_cache).stdout
    assert "4 entries" in human
    # folders of other things (a plugin's compiled code here) are listed with their size, not as results
    (fresh_cache / "precompiled" / "env").mkdir(parents=True)
    (fresh_cache / "precompiled" / "env" / "Block-1.bin").write_bytes(b"x" * 3000)
    listing = json.loads(fluxkiln("cache", "--json", cwd=proj, cache=fresh_cache).stdout)
    assert listing["other_folders"]["precompiled"] == 3000 and "results" not in listing["other_folders"]
    assert "blobs" not in listing["other_folders"] and len(listing["entries"]) == 4
    human = fluxkiln("cache", cwd=proj, cache=fresh_cache).stdout
    assert "other folders" in human and "precompiled/" in human and "2.9 KiB" in human
    res = fluxkiln("cache", "prune", "--max-size", "0", cwd=proj, cache=fresh_cache)
    assert res.returncode == 0 and "removed 4 entries" in res.stdout
    assert json.loads(fluxkiln("cache", "--json", cwd=proj, cache=fresh_cache).stdout)["entries"] == []
    assert fluxkiln("cache", "prune", "--older-than", "soon", cwd=proj, cache=fresh_cache).returncode == 2


def _rewrite_manifest(entry_dir, **changes):
    from fluxkiln.engine.fingerprint import hash_bytes_of

    manifest = json.loads((entry_dir / "manifest.json").read_text())
    manifest["files"] = {rel: [(entry_dir / rel).stat().st_size, hash_bytes_of(entry_dir / rel)]
                         for rel in manifest["files"]}
    manifest.update(changes)
    (entry_dir / "manifest.json").write_text(json.dumps(manifest))


def test_entry_stored_in_an_older_layout_is_recomputed_not_misread(proj, fresh_cache):
    eng = Engine(Registry.load(extra=[textnodes], entry_points=False), cache_dir=fresh_cache)
    eng.run(proj / "r.toml", output=proj / "out")
    for m in (fresh_cache / "results").glob("*/*/manifest.json"):
        _rewrite_manifest(m.parent, port_versions={"output": "0"})
    res = Engine(eng.registry, cache_dir=fresh_cache).run(proj / "r.toml", output=proj / "out")
    assert res.ok and set(res.nodes.values()) == {"ran"}
    assert all(e.data["reason"] == "no cached result" for e in res.events if e.event == "node_started")


def test_verified_but_unreadable_entry_fails_its_node_clearly_then_recomputes(proj, fresh_cache):
    eng = Engine(Registry.load(extra=[textnodes], entry_points=False), cache_dir=fresh_cache)
    first = eng.run(proj / "r.toml", output=proj / "out")
    fp = next(e.data["fingerprint"] for e in first.events if e.event == "node_finished" and e.node == "c")
    entry = next(p for p in (fresh_cache / "results").glob(f"*/{fp}*"))
    (entry / "output" / "value.json").write_text("{not json")
    _rewrite_manifest(entry)
    res = Engine(eng.registry, cache_dir=fresh_cache).run(proj / "r.toml", output=proj / "out")
    failed = next(e for e in res.events if e.event == "node_failed")
    assert failed.node == "c" and "could not be read" in failed.data["error"] and "run again" in failed.data["hint"]
    assert res.status == "failed" and not entry.exists()
    again = Engine(eng.registry, cache_dir=fresh_cache).run(proj / "r.toml", output=proj / "out")
    assert again.ok and again.nodes["c"] == "ran" and again.outputs["c"]["output"] == "hi+file"


def test_canonical_form_is_sorted_compact_unicode_and_stringifies_the_rest():
    assert canonical({"b": 1, "a": ["é", 1.5]}) == '{"a":["é",1.5],"b":1}'
    assert canonical({"p": Path("/x/y")}) == '{"p":"/x/y"}'
    assert digest({"b": 1, "a": 2}) == hashlib.sha256(b'{"a":2,"b":1}').hexdigest() == digest({"a": 2, "b": 1})


def test_identity_holds_everything_that_decides_a_result():
    ident = identity("t", "2", {"k": 1}, {"in": "fp"}, {"f": "h"})
    assert ident == {"type": "t", "version": "2", "params": {"k": 1}, "inputs": {"in": "fp"}, "files": {"f": "h"}}


def test_reasons_name_every_difference_in_words():
    old = identity("t", "1", {"a": 1, "b": "x" * 50, "gone": 1}, {"in": "f1", "same": "s"},
                   {"k1": "h1", "(model)": "m1", "k2": "h"})
    new = identity("t", "2", {"a": 2, "b": "y" * 50, "new": [1]}, {"in": "f2", "same": "s"},
                   {"k1": "h2", "(model)": "m2", "k2": "h"})
    assert diff_reasons(old, new, {"k1": "data.txt"}) == [
        "implementation version changed 1 -> 2",
        "param 'a' changed 1 -> 2",
        "param 'b' changed " + repr("x" * 50)[:37] + "... -> " + repr("y" * 50)[:37] + "...",
        "param 'gone' changed 1 -> null",
        "param 'new' changed null -> [1]",
        "input 'in' changed",
        "model changed",
        "file 'data.txt' changed",
    ]
    assert diff_reasons(identity("u", "1", {}, {}, {}), identity("t", "2", {}, {}, {}), {}) == ["type changed u -> t"]
    assert diff_reasons(None, new, {}) == [] and diff_reasons({}, new, {}) == []
    assert diff_reasons(new, new, {}) == []
    assert diff_reasons(identity("t", "1", {}, {}, {"k": "h"}), identity("t", "1", {}, {}, {"k": "i"}), {}) == [
        "file 'k' changed"]


def test_reasons_against_an_identity_of_an_older_format_and_new_keys():
    new = identity("t", "1", {"p": 1}, {"in": "f"}, {"k": "h"})
    assert diff_reasons({"type": "t", "version": "1"}, new, {}) == [
        "param 'p' changed null -> 1", "input 'in' changed", "file 'k' changed"]
    old = identity("t", "1", {}, {}, {})
    assert diff_reasons(old, new, {}) == ["param 'p' changed null -> 1", "input 'in' changed", "file 'k' changed"]
    assert diff_reasons(new, old, {}) == ["param 'p' changed 1 -> null", "input 'in' changed", "file 'k' changed"]


def test_reasons_say_when_development_mode_switched():
    plain = identity("t", "1", {}, {}, {})
    dev = identity("t", "1", {}, {}, {devmode.LABEL: "code"})
    assert diff_reasons(plain, dev, {}) == ["development mode (FLUXKILN_DEV) switched on"]
    assert diff_reasons(dev, plain, {}) == ["development mode (FLUXKILN_DEV) switched off"]
    other = identity("t", "1", {}, {}, {devmode.LABEL: "changed code"})
    assert diff_reasons(dev, other, {}) == [f"{devmode.LABEL[1:-1]} changed"]


def test_file_hashes_are_remembered_by_size_and_time_and_saved(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"one")
    index = tmp_path / "index" / "hashes.json"
    hasher = FileHasher(index)
    assert hasher.file(f) == hashlib.sha256(b"one").hexdigest()
    stamp = f.stat()
    f.write_bytes(b"two")  # same size: with the old time the remembered hash stands
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert hasher.file(f) == hashlib.sha256(b"one").hexdigest()
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert hasher.file(f) == hashlib.sha256(b"two").hexdigest()
    hasher.save()
    again = FileHasher(index)
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    f.write_bytes(b"333")
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert again.file(f) == hashlib.sha256(b"two").hexdigest(), "the saved index is read back"


def test_file_hashes_are_remembered_per_file(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"aaa")
    b.write_bytes(b"bbb")
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))  # same size and time, other content
    hasher = FileHasher()
    assert (hasher.file(a), hasher.file(b)) == (hashlib.sha256(b"aaa").hexdigest(), hashlib.sha256(b"bbb").hexdigest())
