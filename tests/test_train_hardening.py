"""Training state under attack: corrupt checkpoints are logged and rewritten, concurrent runs take turns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_train_support import checkpoints, run, solid_dataset, write_recipe

from fluxkiln.plugins.train import checkpoint


def _logs(result) -> str:
    return "\n".join(e.data["message"] for e in result.events if e.event == "node_log" and e.node == "lora")


def test_corrupt_checkpoint_of_the_same_size_is_logged_skipped_and_rewritten(tmp_path, one_torch_thread):
    data = solid_dataset(tmp_path / "data")
    # resume = "always": the forced rerun below resumes (a forced train_lora otherwise starts from scratch)
    recipe = write_recipe(tmp_path / "r.toml", data, steps=4, save_every=2, keep_last=3, resume="always")
    cache = tmp_path / "cache"
    assert run(recipe, cache, tmp_path / "out").ok
    root = checkpoints(cache)[0].parent
    newest = root / "ckpt-000004"
    weights = newest / checkpoint.WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[-8:] = bytes(255 - b for b in blob[-8:])  # same size, different bytes
    weights.write_bytes(bytes(blob))
    assert checkpoint.check(newest)[1] is None and checkpoint.check(newest, verify=True)[1] is not None

    from fluxkiln.engine.runner import Engine

    again = Engine(cache_dir=cache).run(recipe, output=tmp_path / "out", force=["lora"])
    assert again.ok
    logs = _logs(again)
    assert "checkpoint ckpt-000004 skipped: weights.safetensors does not match the sha256" in logs, logs
    assert "resuming from checkpoint at step 2" in logs
    assert "checkpoint ckpt-000004 is unusable" in logs and "writing it again" in logs, logs
    assert checkpoint.check(newest, verify=True) == (json.loads((newest / "meta.json").read_text()), None)
    assert checkpoint.load_latest(root, 100).step == 4


def test_torn_checkpoint_is_logged_when_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "ckpt-000006").mkdir(parents=True)
    (root / "ckpt-000006" / "weights.safetensors").write_bytes(b"x")
    seen: list[str] = []
    assert checkpoint.load_latest(root, 100, log=seen.append) is None
    assert seen == ["checkpoint ckpt-000006 skipped: meta.json is missing (the write was interrupted)"]


class _Events:
    """The JSON events of a subprocess, read in a thread (so a full pipe never blocks the process)."""

    def __init__(self, proc):
        import queue
        import threading

        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            if line.startswith("{"):
                self.q.put(json.loads(line))

    def until(self, test, what: str, timeout: float = 120):
        import queue
        import time

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                e = self.q.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if test(e):
                return e
        raise AssertionError(f"no {what} within {timeout} s")

    def lora_log(self, fragment: str) -> str:
        return self.until(lambda e: e["event"] == "node_log" and e.get("node") == "lora"
                          and fragment in e["message"], repr(fragment))["message"]


def test_two_runs_of_one_training_state_take_turns(tmp_path):
    """A second process training the same configuration (into another run folder) waits for the first, saying
    so; when the first stops, the second resumes from the checkpoint it left. Nothing is corrupted."""
    import signal

    data = solid_dataset(tmp_path / "data")
    # steps: more than the first can finish before the second has started (it is interrupted anyway); GPUs
    # hidden: this is about the lock between processes, and on a GPU each process would first compile the blocks
    # for training (cold cache, under the load of a parallel suite) and then train the tiny model too fast
    recipe = write_recipe(tmp_path / "r.toml", data, steps=2000, save_every=2, keep_last=2)
    env = {**os.environ, "FLUXKILN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}

    def start(i):
        return subprocess.Popen([sys.executable, "-m", "fluxkiln.engine.cli", "run", str(recipe), "--json",
                                 "--output", str(tmp_path / f"out{i}")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)

    first, second = start(1), None
    try:
        _Events(first).until(lambda e: e["event"] == "node_progress" and e.get("node") == "lora"
                             and e.get("metrics"), "training progress")
        second = start(2)
        events2 = _Events(second)
        waiting = events2.lora_log(" is in use by ")
        assert "the resumable state of node 'lora'" in waiting and "waiting until it is free" in waiting
        first.send_signal(signal.SIGINT)  # the first stops at its next step, with a checkpoint
        assert first.wait(120) == 130
        resumed = events2.lora_log("resuming from checkpoint at step")
        second.send_signal(signal.SIGINT)
        assert second.wait(120) == 130
    finally:
        for p in (first, second):
            if p is not None:
                p.kill()
    step = int(resumed.split("at step ")[1].split()[0])
    found = checkpoints(tmp_path / "cache")
    assert found and step in [int(p.name.split("-")[1]) for p in found] + [step]
    for p in found:
        assert checkpoint.check(p, verify=True)[1] is None
    assert not list(found[0].parent.glob(".ckpt-*")), "temporary checkpoint folders left behind"
