"""A cache entry is used only when it is exactly what the node stores: layout, outputs, versions, files."""

from __future__ import annotations

import json

import pytest

from fluxkiln.engine.artifacts import Artifact
from fluxkiln.engine.cache import MANIFEST, DiskCache, MemoryCache
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine
from helpers import textnodes


@pytest.fixture(scope="module")
def port_types():
    return Registry.load(extra=[textnodes], entry_points=False).port_types


@pytest.fixture
def stored(tmp_path, port_types):
    """A disk cache holding one text result with one artifact copy; (cache, fingerprint)."""
    disk = DiskCache(tmp_path / "cache")
    out = tmp_path / "out.txt"
    out.write_text("hello")
    art = Artifact(path=str(out), size=5, sha="2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
                   rel="a/out.txt")
    disk.store("fp1", {"output": "hello"}, {"output": "text"}, port_types, {"type": "const"}, [art])
    return disk, "fp1"


def edit_manifest(disk, fp, change):
    path = disk.entry_dir(fp) / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_stored_entry_is_found_with_or_without_the_expected_outputs(stored):
    disk, fp = stored
    entry = disk.lookup(fp)
    assert entry is not None and entry.manifest["outputs"] == {"output": "text"}
    assert [a.rel for a in entry.artifacts] == ["a/out.txt"]
    assert disk.lookup(fp, outputs={"output": "text"}) is not None
    assert disk.lookup(fp, outputs={"output": "images"}) is None, "stored for other outputs: a miss, and removed"
    assert disk.lookup(fp) is None


def test_an_entry_of_another_layout_is_a_miss_even_if_otherwise_sound(stored):
    disk, fp = stored
    edit_manifest(disk, fp, lambda m: m.update(layout=m["layout"] - 1))
    assert disk.lookup(fp) is None and not disk.entry_dir(fp).exists()


def test_port_versions_must_match(stored):
    disk, fp = stored
    versions = json.loads((disk.entry_dir(fp) / MANIFEST).read_text()).get("port_versions")
    assert disk.lookup(fp, versions=versions) is not None
    assert disk.lookup(fp, versions={"text": "another"}) is None


def test_a_manifest_without_artifacts_has_none(stored):
    disk, fp = stored
    edit_manifest(disk, fp, lambda m: m.pop("artifacts"))
    entry = disk.lookup(fp)
    assert entry is not None and entry.artifacts == []


def test_artifacts_must_have_their_copy_in_the_entry_unless_not_stored(stored):
    disk, fp = stored
    extra = {"path": "/elsewhere/x.txt", "size": 1, "sha": "0" * 64}  # a file that was never copied
    edit_manifest(disk, fp, lambda m: m["artifacts"].append(extra))
    entry = disk.lookup(fp)
    assert entry is not None and len(entry.artifacts) == 2
    edit_manifest(disk, fp, lambda m: m["artifacts"].append({**extra, "stored": "files/missing.txt"}))
    assert disk.lookup(fp) is None, "a copy the manifest does not list: a miss"


def test_the_entry_knows_its_fingerprint_and_a_copy_of_another_size_is_a_miss(stored):
    disk, fp = stored
    entry = disk.lookup(fp)
    assert entry.fingerprint == fp and entry.path == disk.entry_dir(fp)
    target = next(p for p in entry.path.rglob("*") if p.is_file() and p.name != MANIFEST)
    with open(target, "ab") as f:
        f.write(b" ")  # one byte more: the size differs, whatever the hash would say
    disk.begin()
    assert disk.lookup(fp) is None


def test_a_memory_hit_whose_disk_entry_is_gone_is_dropped(tmp_path):
    memory = MemoryCache()
    entry = tmp_path / "entry"
    entry.mkdir()
    memory.put("a", {"output": 1}, entry=entry)
    memory.put("b", {"output": 2})
    assert memory.hit("a").outputs == {"output": 1} and memory.hit("b").entry is None
    entry.rmdir()
    assert memory.hit("a") is None and memory.keys() == {"b"}
    assert memory.get("b") == {"output": 2}


def test_a_recipe_moved_with_its_files_reruns_nothing(tmp_path, fresh_cache):
    """A file parameter enters the fingerprint by content, not by where the recipe folder is."""
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "data.txt").write_text("same")
        (tmp_path / folder / "r.toml").write_text('[recipe]\nname="m"\n[nodes.r]\ntype="read_file"\npath="data.txt"\n')
    engine = Engine(Registry.load(extra=[textnodes], entry_points=False), cache_dir=fresh_cache)
    first = engine.run(tmp_path / "one" / "r.toml", output=tmp_path / "out1")
    second = engine.run(tmp_path / "two" / "r.toml", output=tmp_path / "out2")
    assert first.ok and second.nodes == {"r": "cached"}
