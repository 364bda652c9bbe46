"""`fluxkiln watch`: real file edits, debouncing, invalid edits, JSON event stream."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from clihelp import cli_env

RECIPE = '[recipe]\nname = "w"\n[nodes.a]\ntype = "const"\nvalue = "{v}"\n[nodes.b]\ntype = "concat"\nleft = "@a"\nright = "@src"\n[nodes.src]\ntype = "read_file"\npath = "data/in.txt"\n'


class Watch:
    def __init__(self, proj, cache):
        self.proc = subprocess.Popen([sys.executable, "-m", "fluxkiln.engine.cli", "watch", "r.toml", "--json",
                                      "--debounce", "0.4"], cwd=proj, env=cli_env(cache), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.q.put(json.loads(line))

    def until(self, event, timeout=60):
        seen = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                e = self.q.get(timeout=deadline - time.time())
            except queue.Empty:
                break
            seen.append(e)
            if e["event"] == event:
                return e, seen
        raise AssertionError(f"no {event} within {timeout}s; saw {[s['event'] for s in seen]}")

    def quiet(self, seconds):
        """Events that arrive within `seconds` (expect none)."""
        time.sleep(seconds)
        out = []
        while not self.q.empty():
            out.append(self.q.get_nowait())
        return out

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture
def watch(tmp_path, fresh_cache):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("x")
    (tmp_path / "r.toml").write_text(RECIPE.format(v="one"))
    w = Watch(tmp_path, fresh_cache)
    first, _ = w.until("watch_rerun")
    assert first["ran"] == ["a", "src", "b"] or set(first["ran"]) == {"a", "b", "src"}
    w.until("watch_waiting")
    yield w, tmp_path
    assert w.stop() == 130


def test_in_place_write_reruns_only_affected(watch):
    w, proj = watch
    (proj / "r.toml").write_text(RECIPE.format(v="two"))
    rerun, seen = w.until("watch_rerun")
    assert set(rerun["ran"]) == {"a", "b"} and rerun["cached"] == ["src"]
    started = {e["node"]: e["reason"] for e in seen if e["event"] == "node_started"}
    assert started["a"] == "param 'value' changed 'one' -> 'two'"


def test_temp_file_then_rename_is_seen(watch):
    w, proj = watch
    tmp = proj / ".r.toml.swp"
    tmp.write_text(RECIPE.format(v="renamed"))
    os.replace(tmp, proj / "r.toml")
    rerun, _ = w.until("watch_rerun")
    assert "a" in rerun["ran"]


def test_burst_of_saves_gives_one_rerun(watch):
    w, proj = watch
    for i in range(10):
        (proj / "r.toml").write_text(RECIPE.format(v=f"burst{i}"))
        time.sleep(0.02)
    rerun, _ = w.until("watch_rerun")
    w.until("watch_waiting")
    assert [e for e in w.quiet(1.5) if e["event"] == "watch_rerun"] == []
    assert rerun["run"] == 2


def test_invalid_save_keeps_last_valid_recipe(watch):
    w, proj = watch
    (proj / "r.toml").write_text(RECIPE.format(v="three").replace('type = "concat"', 'type = "concta"'))
    invalid, _ = w.until("watch_invalid")
    assert invalid["message"] == "keeping the last valid recipe"
    assert invalid["problems"][0]["node"] == "b" and "did you mean 'concat'" in invalid["problems"][0]["hint"]
    assert [e for e in w.quiet(1.0) if e["event"] == "watch_rerun"] == []
    (proj / "r.toml").write_text(RECIPE.format(v="four"))
    rerun, _ = w.until("watch_rerun")
    assert set(rerun["ran"]) == {"a", "b"}


def test_input_file_change_and_own_outputs_ignored(watch):
    w, proj = watch
    (proj / "data" / "in.txt").write_text("new content")
    rerun, _ = w.until("watch_rerun")
    assert set(rerun["ran"]) == {"src", "b"}
    w.until("watch_waiting")
    # the rerun wrote runs/w/...: no further rerun may follow from our own outputs
    assert [e for e in w.quiet(1.5) if e["event"] == "watch_rerun"] == []


def test_change_during_run_cancels_it_and_starts_new_one(tmp_path, fresh_cache):
    slow = '[recipe]\nname = "w2"\n[nodes.a]\ntype = "const"\nvalue = "{v}"\n[nodes.s]\ntype = "slow"\ntext = "@a"\nsteps = 400\ndelay = 0.05\n'
    (tmp_path / "r.toml").write_text(slow.format(v="one"))
    w = Watch(tmp_path, fresh_cache)
    try:
        w.until("node_progress")
        (tmp_path / "r.toml").write_text(slow.format(v="two"))
        cancelled, _ = w.until("node_cancelled", timeout=30)
        assert cancelled["node"] == "s"
        summary, _ = w.until("watch_rerun")
        assert summary["status"] == "cancelled"
        restarted, seen = w.until("node_started")
        assert restarted["node"] == "a" and restarted["reason"] == "param 'value' changed 'one' -> 'two'"
    finally:
        assert w.stop() == 130


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_torch_run_exits_130_cleanly(presses, tmp_path, fresh_cache):
    """Ctrl-C while a run is inside torch: no abort at interpreter exit (SIGABRT), exit 130 like `run`."""
    (tmp_path / "t.toml").write_text('[recipe]\nname = "t"\n[nodes.spin]\ntype = "torch_spin"\n')
    env = cli_env(fresh_cache, FLUXKILN_PLUGIN_MODULES="helpers.torchnodes")
    proc = subprocess.Popen([sys.executable, "-m", "fluxkiln.engine.cli", "watch", "t.toml", "--json"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if '"node_progress"' in line:
            break
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "terminate called" not in err and "Traceback" not in err, err
    assert "stopping at the next safe point" in err, err
    if presses == 2 and "aborted" not in err:  # the second press came after the stop completed: still 130
        assert err.count("fluxkiln:") == 1, err
