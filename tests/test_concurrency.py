"""Concurrent runs on one recipe and one cache: every run succeeds, every output is right, the cache verifies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from clihelp import cli_env, events
from fluxkiln.engine import hookimpl
from fluxkiln.engine.cache import DiskCache
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine
from helpers import textnodes
from helpers.recipes import DEMO, node

RECIPE = DEMO + node("wait", "slow", text="@b", steps=10, delay=0.03) + node("c", "concat", left="@wait", sep="!",
                                                                                right="@a")


def _start(proj, cache, *extra):
    return subprocess.Popen([sys.executable, "-m", "fluxkiln.engine.cli", "run", "r.toml", "--json", *extra], cwd=proj,
                            env=cli_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cache_verifies(cache) -> None:
    disk = DiskCache(cache)
    entries = disk.entries()
    assert entries, "the runs stored nothing"
    for e in entries:
        assert disk.lookup(e["fingerprint"]) is not None, f"cache entry {e['path']} does not verify"
    assert not list((cache / "tmp").glob("*")) if (cache / "tmp").exists() else True, "staging left in the cache"


def _run_folder_is_complete(run_dir) -> None:
    assert (run_dir / "b" / "out.txt").read_text() == "hi+hi"
    assert (run_dir / "c" / "out.txt").read_text() == "hi+hi!hi"
    json.loads((run_dir / ".fluxkiln" / "identities.json").read_text())
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


@pytest.mark.parametrize("layout", ["one run folder", "a folder each"])
def test_six_runs_at_once_on_one_recipe_and_cache(layout, tmp_path, fresh_cache):
    (tmp_path / "r.toml").write_text(RECIPE)
    outs = [tmp_path / "runs" / "demo"] * 6 if layout == "one run folder" else \
        [tmp_path / f"out{i}" for i in range(6)]
    procs = [_start(tmp_path, fresh_cache, "--output", str(out)) for out in outs]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, [(e["error"], e.get("where")) for e in events(out) if e["event"] == "node_failed"]
        assert "Traceback" not in err, err
        evs = events(out)
        assert evs[-1]["event"] == "run_finished" and evs[-1]["status"] == "ok", evs[-1]
    for out in set(outs):
        _run_folder_is_complete(out)
    _cache_verifies(fresh_cache)
    if layout == "one run folder":  # they took turns, and the ones that waited said so
        waited = [e for out, _ in results for e in events(out) if e["event"] == "run_waiting"]
        assert waited and all(" is in use by " in e["message"] for e in waited), waited


def test_a_run_waits_for_the_run_folder_and_a_cancel_stops_the_wait(tmp_path, fresh_cache):
    (tmp_path / "r.toml").write_text(RECIPE.replace("steps = 10", "steps = 200"))
    first, second = (Engine(Registry.load(extra=[textnodes], entry_points=False), cache_dir=fresh_cache)
                     for _ in range(2))
    out = tmp_path / "runs" / "demo"
    started, waits = threading.Event(), []

    class Seen:
        @hookimpl
        def on_event(self, event):
            if event.event == "node_started" and event.node == "wait":
                started.set()
            if event.event == "run_waiting":
                waits.append(event)
                second.cancel()

    holder = threading.Thread(target=first.run, args=(tmp_path / "r.toml",),
                              kwargs={"output": out, "observers": [Seen()]})
    holder.start()
    assert started.wait(60)
    result = second.run(tmp_path / "r.toml", output=out, observers=[Seen()])
    first.cancel()
    holder.join(30)
    assert result.status == "cancelled" and result.nodes == {}
    assert len(waits) == 1 and str(out) in waits[0].data["message"]


def test_a_killed_run_leaves_no_stale_lock(tmp_path, fresh_cache):
    """kill -9 while holding the run folder: the next run neither waits nor finds anything half-written."""
    import signal

    (tmp_path / "r.toml").write_text(RECIPE.replace("steps = 10", "steps = 500"))
    proc = _start(tmp_path, fresh_cache)
    for line in proc.stdout:
        if '"node_progress"' in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (tmp_path / "runs" / "demo" / ".fluxkiln" / "run.lock").exists()
    (tmp_path / "r.toml").write_text(RECIPE)
    again = _start(tmp_path, fresh_cache)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert not [e for e in events(out) if e["event"] == "run_waiting"]
    _run_folder_is_complete(tmp_path / "runs" / "demo")
    _cache_verifies(fresh_cache)


def test_a_lock_wait_can_be_bounded(tmp_path):
    """``locks.hold(timeout_s=...)``: a holder that does not let go ends the wait with a TimeoutError naming
    what was waited for and who holds it, instead of waiting forever."""
    import time

    from fluxkiln.engine import locks

    lock = tmp_path / "x.lock"
    with locks.hold(lock, "the first"):
        waited = []
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"the second was still in use by pid \d+ .* after 0.3 s"), \
                locks.hold(lock, "the second", on_wait=waited.append, timeout_s=0.3):
            pass
        assert 0.25 < time.monotonic() - t0 < 5 and len(waited) == 1
    with locks.hold(lock, "the second", timeout_s=0.3):  # free again: held at once
        pass
