"""The disk cache stays lean and healthy: shared payloads stored once, a budget, listings, unusable caches;
an entry is used only when it is exactly what the node stores."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from clihelp import cli_env, events, fluxkiln
from fluxkiln.engine.artifacts import Artifact
from fluxkiln.engine.cache import MANIFEST, DiskCache, MemoryCache
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine
from helpers import imagenodes, textnodes
from helpers.recipes import IMAGE_PLUGINS, checked_and_saved, node, recipe_text

PLUGINS = IMAGE_PLUGINS


def write(proj, name="lean", seed=1, size=32, file="r.toml"):
    gen = node("gen", "fake_image", seed=seed, width=size, height=size)
    (proj / file).write_text(recipe_text(name, gen, checked_and_saved()))
    return proj / file


def engine(cache):
    return Engine(Registry.load(extra=[textnodes, imagenodes], entry_points=False), cache_dir=cache)


def cache_bytes(cache):
    """Bytes the result cache takes on disk: every file once, however many hard links it has."""
    seen, total = set(), 0
    for sub in ("results", "blobs"):
        for p in (cache / sub).rglob("*"):
            st = p.lstat()
            if p.is_file() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def run_cli(proj, cache, *args, ok=True, **env):
    res = fluxkiln("run", "r.toml", *args, cwd=proj, cache=cache, **PLUGINS, **env)
    assert (res.returncode == 0) == ok, res.stderr
    return res


def test_one_megapixel_image_through_sample_check_save_costs_at_most_1_2_raw_images(tmp_path, fresh_cache):
    recipe = write(tmp_path, size=1024)
    assert engine(fresh_cache).run(recipe, output=tmp_path / "run").ok
    raw = 1024 * 1024 * 3
    assert cache_bytes(fresh_cache) <= 1.2 * raw
    manifests = list((fresh_cache / "results").glob("*/*/manifest.json"))
    assert len(manifests) == 3  # every node is still cached on its own


def test_a_corrupt_shared_payload_is_never_used_and_is_stored_afresh(tmp_path, fresh_cache):
    recipe = write(tmp_path)
    first = engine(fresh_cache).run(recipe, output=tmp_path / "run")
    pixels = first.outputs["saved"]["output"][0].image.tobytes()
    npy = next(p for p in (fresh_cache / "results").glob("*/*/output/0000.npy"))
    blob = next(b for b in (fresh_cache / "blobs").rglob("*") if b.is_file() and os.path.samefile(b, npy))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: gen, checked and saved all hold this payload
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    again = engine(fresh_cache).run(recipe, output=tmp_path / "run")
    assert {n: s for n, s in again.nodes.items()} == {"gen": "ran", "checked": "ran", "saved": "ran"}
    assert again.outputs["saved"]["output"][0].image.tobytes() == pixels
    third = engine(fresh_cache).run(recipe, output=tmp_path / "run")
    assert set(third.nodes.values()) == {"cached"}
    assert third.outputs["saved"]["output"][0].image.tobytes() == pixels


def test_budget_prunes_least_recently_used_after_a_run_but_never_what_it_uses(tmp_path, fresh_cache):
    write(tmp_path, name="old", seed=1)
    run_cli(tmp_path, fresh_cache)
    past = time.time() - 3600
    for entry in (fresh_cache / "results").glob("*/*"):
        os.utime(entry, (past, past))
    write(tmp_path, name="new", seed=2, size=40)
    res = run_cli(tmp_path, fresh_cache, "--json", FLUXKILN_CACHE_BUDGET="1K")
    logs = [e["message"] for e in events(res.stdout) if e["event"] == "node_log" and "node" not in e]
    assert any("removed the 3 least recently used entries" in m for m in logs), logs
    listing = json.loads(fluxkiln("cache", "--json", cwd=tmp_path, cache=fresh_cache).stdout)
    assert {e["recipe"] for e in listing["entries"]} == {"new"} and len(listing["entries"]) == 3
    again = events(run_cli(tmp_path, fresh_cache, "--json", FLUXKILN_CACHE_BUDGET="1K").stdout)
    assert set(again[-1]["nodes"].values()) == {"cached"}  # what the run used was kept
    assert (tmp_path / "runs" / "new" / "saved_0.webp").is_file()


def test_budget_variable_that_is_not_a_size_gives_one_warning(tmp_path, fresh_cache):
    write(tmp_path)
    res = run_cli(tmp_path, fresh_cache, FLUXKILN_CACHE_BUDGET="lots")
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "FLUXKILN_CACHE_BUDGET='lots' is not a size" in warnings[0]


def test_cache_list_shows_size_by_node_type_and_by_recipe(tmp_path, fresh_cache):
    write(tmp_path, name="alpha", seed=1)
    run_cli(tmp_path, fresh_cache)
    write(tmp_path, name="beta", seed=3)
    run_cli(tmp_path, fresh_cache)
    listing = json.loads(fluxkiln("cache", "--json", cwd=tmp_path, cache=fresh_cache).stdout)
    assert set(listing["by_type"]) == {"fake_image", "pass_check", "save"}
    assert set(listing["by_recipe"]) == {"alpha", "beta"}
    assert listing["by_recipe"]["alpha"]["entries"] == 3
    total = listing["total"]
    assert sum(r["bytes"] for r in listing["by_type"].values()) == total == sum(
        r["bytes"] for r in listing["by_recipe"].values())
    assert abs(total - cache_bytes(fresh_cache)) < 4096  # shared bytes count once
    text = fluxkiln("cache", cwd=tmp_path, cache=fresh_cache).stdout
    assert "by node type:" in text and "by recipe:" in text and "fake_image" in text and "beta" in text


def _fingerprint_prefix(proj, cache):
    res = fluxkiln("run", "r.toml", "--explain", "--json", cwd=proj, cache=cache, **PLUGINS)
    return json.loads(res.stdout)["saved"]["fingerprint"][:2]


@pytest.mark.parametrize("blocked", ["tmp", "results", "results/xx", "blobs"])
def test_a_file_where_a_cache_folder_belongs_runs_uncached_with_one_warning(tmp_path, fresh_cache, blocked):
    write(tmp_path)
    if blocked == "results/xx":
        blocked = f"results/{_fingerprint_prefix(tmp_path, fresh_cache)}"
        (fresh_cache / "results").mkdir()
    (fresh_cache / blocked).write_text("in the way")
    for _ in range(2):
        res = run_cli(tmp_path, fresh_cache)
        warnings = [line for line in res.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1, res.stderr
        assert f"{fresh_cache / blocked} is a file where the cache keeps a folder; move or delete it" in warnings[0]
        assert "FLUXKILN_CACHE" in warnings[0] and "Traceback" not in res.stderr and "Errno" not in res.stderr
        assert "3 ran" in res.stderr and (tmp_path / "runs" / "lean" / "saved_0.webp").is_file()
    evs = events(run_cli(tmp_path, fresh_cache, "--json").stdout)
    assert len([e for e in evs if e["event"] == "node_log" and e.get("level") == "warning"]) == 1


def _read_only_command(cache):
    """How to run a command with ``cache`` read-only: chmod for a normal user, a read-only bind mount for root."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("running as root without mount namespaces: cannot make the cache read-only")
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(cache)]


def _chmod_tree(root, writable):
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod((p.stat().st_mode | 0o200) if writable else (p.stat().st_mode & ~0o222))


def test_a_read_only_cache_runs_with_one_warning_and_still_serves_what_it_holds(tmp_path, fresh_cache):
    write(tmp_path)
    run_cli(tmp_path, fresh_cache)
    prefix = _read_only_command(fresh_cache)
    if not prefix:
        _chmod_tree(fresh_cache, writable=False)
    try:
        for args, expect in ((["--output", "again"], {"cached"}), (["--set", "nodes.gen.seed=9"], {"ran"})):
            res = subprocess.run([*prefix, sys.executable, "-m", "fluxkiln.engine.cli", "run", "r.toml", "--json",
                                  *args], cwd=tmp_path, env=cli_env(fresh_cache, **PLUGINS), capture_output=True,
                                 text=True, timeout=120)
            assert res.returncode == 0, res.stderr
            evs = events(res.stdout)
            warnings = [e["message"] for e in evs if e["event"] == "node_log" and e.get("level") == "warning"]
            assert len(warnings) == 1 and "read-only" in warnings[0] and "FLUXKILN_CACHE" in warnings[0]
            assert expect <= set(evs[-1]["nodes"].values()) and "Traceback" not in res.stderr
        assert (tmp_path / "again" / "saved_0.webp").is_file()
    finally:
        if not prefix:
            _chmod_tree(fresh_cache, writable=True)


def test_a_manifest_naming_an_unknown_port_type_is_a_miss(tmp_path, fresh_cache):
    write(tmp_path)
    run_cli(tmp_path, fresh_cache)
    for m in (fresh_cache / "results").glob("*/*/manifest.json"):
        manifest = json.loads(m.read_text())
        manifest["outputs"] = {"output": "no-such-port"}
        m.write_text(json.dumps(manifest))
    evs = events(run_cli(tmp_path, fresh_cache, "--json").stdout)
    assert {e["node"]: e["reason"] for e in evs if e["event"] == "node_started"} == dict.fromkeys(
        ("gen", "checked", "saved"), "no cached result")
    assert set(events(run_cli(tmp_path, fresh_cache, "--json").stdout)[-1]["nodes"].values()) == {"cached"}


def test_many_runs_at_once_share_one_cache_safely(tmp_path, fresh_cache):
    recipe = write(tmp_path)
    results, errors = {}, []

    def go(i):
        try:
            results[i] = engine(fresh_cache).run(recipe, output=tmp_path / f"run{i}")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    failed = {i: [e.data for e in r.events if e.event in ("node_failed", "run_waiting")] for i, r in results.items()
              if not r.ok}
    assert not errors and len(results) == 6 and not failed, (errors, failed)
    first = (tmp_path / "run0" / "saved_0.webp").read_bytes()
    assert all((tmp_path / f"run{i}" / "saved_0.webp").read_bytes() == first for i in range(6))
    final = engine(fresh_cache).run(recipe, output=tmp_path / "last")
    assert set(final.nodes.values()) == {"cached"} and (tmp_path / "last" / "saved_0.webp").read_bytes() == first
    assert not list((fresh_cache / "tmp").iterdir())


def _failing(monkeypatch, owner, name, failures, when=lambda *a: True):
    """``owner.name`` raises each of ``failures`` in turn (on calls where ``when`` says so), then works; returns
    the failures not raised yet."""
    real, left = getattr(owner, name), list(failures)

    def flaky(*a, **k):
        if left and when(*a):
            raise left.pop(0)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, flaky)
    return left


def test_a_cached_result_that_cannot_be_read_or_placed_for_a_moment_is_tried_again(tmp_path, fresh_cache,
                                                                                   monkeypatch):
    """What a run sees while another one swaps the same entry into place: files gone, or any other error of the
    file system for an instant, while reading the entry or while linking its files into the run folder."""
    from fluxkiln.engine import runcache

    recipe = write(tmp_path)
    assert engine(fresh_cache).run(recipe, output=tmp_path / "a").ok
    read_left = _failing(monkeypatch, runcache.RunCaches, "load", [OSError(errno.EIO, "Input/output error")])
    place_left = _failing(monkeypatch, runcache, "restore", [OSError(errno.EBUSY, "Device or resource busy"),
                                                             FileNotFoundError(errno.ENOENT, "gone")],
                          when=lambda todo, *rest: bool(todo))
    again = engine(fresh_cache).run(recipe, output=tmp_path / "b")
    assert again.ok and set(again.nodes.values()) == {"cached"}, again.events
    assert not read_left and not place_left
    assert (tmp_path / "b" / "saved_0.webp").read_bytes() == (tmp_path / "a" / "saved_0.webp").read_bytes()


def test_a_run_folder_that_keeps_refusing_the_cached_files_fails_the_node_and_says_what_to_check(
        tmp_path, fresh_cache, monkeypatch):
    from fluxkiln.engine import runcache

    recipe = write(tmp_path)
    assert engine(fresh_cache).run(recipe, output=tmp_path / "a").ok
    target = str(tmp_path / "b" / "saved_0.webp")
    _failing(monkeypatch, runcache, "restore", [PermissionError(errno.EACCES, "Permission denied", target)] * 5,
             when=lambda todo, *rest: bool(todo))
    result = engine(fresh_cache).run(recipe, output=tmp_path / "b")
    assert not result.ok
    failed = [e.data for e in result.events if e.event == "node_failed"]
    assert len(failed) == 1
    assert "its cached files could not be put into the run folder" in failed[0]["error"]
    assert "Permission denied" in failed[0]["error"] and target in failed[0]["error"]
    assert "writable" in failed[0]["hint"]
    assert set(engine(fresh_cache).run(recipe, output=tmp_path / "c").nodes.values()) == {"cached"}  # entry kept


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


def test_an_entry_replaced_while_it_is_read_is_not_taken_for_corrupt(stored, port_types, monkeypatch):
    """Another run replaces the entry (different bytes) while this one checks its files: the check fails on the
    moved files, but the entry now in place is the other run's, whole — found, not discarded (it was, and six
    runs at once then sometimes left a node with no cached result)."""
    disk, fp = stored
    real = disk.check
    replaced = []

    def check(path, size, sha):
        if not replaced:
            replaced.append(True)
            disk.store(fp, {"output": "hello again"}, {"output": "text"}, port_types, {"type": "const"})
        return real(path, size, sha)

    monkeypatch.setattr(disk, "check", check)
    entry = disk.lookup(fp)
    assert replaced and entry is not None
    assert disk.load(entry, port_types) == {"output": "hello again"}
    monkeypatch.setattr(disk, "check", real)
    again = disk.lookup(fp)
    assert again is not None and disk.load(again, port_types) == {"output": "hello again"}


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
