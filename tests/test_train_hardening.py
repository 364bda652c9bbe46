"""Training state under attack: corrupt checkpoints are logged and rewritten, concurrent runs take turns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_train_support import checkpoints, load_weights, run, solid_dataset, write_recipe

from fluxkiln.plugins.train import checkpoint


def _logs(result) -> str:
    return "\n".join(e.data["message"] for e in result.events if e.event == "node_log" and e.node == "lora")


def test_corrupt_checkpoint_of_the_same_size_is_logged_skipped_and_rewritten(tmp_path, one_torch_thread):
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=4, save_every=2, keep_last=3)
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


def test_two_runs_of_one_training_state_take_turns(tmp_path):
    """Two processes train the same configuration into two run folders at once: the second waits for the
    first (saying so), then resumes its finished state; both succeed with the same LoRA."""
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=4, save_every=2)
    env = {**os.environ, "FLUXKILN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "fluxkiln.engine.cli", "run", str(recipe), "--json",
                               "--output", str(tmp_path / f"out{i}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    logs = [json.loads(line) for out, _ in outs for line in out.splitlines() if line.startswith("{")]
    messages = [e["message"] for e in logs if e["event"] == "node_log" and e.get("node") == "lora"]
    finished = [e for e in logs if e["event"] in ("node_finished", "node_cached") and e.get("node") == "lora"]
    assert len(finished) == 2
    if not any(e["event"] == "node_cached" for e in finished):  # both ran: the second waited for the state
        assert any("resumable state of node 'lora'" in m and " is in use by " in m for m in messages), messages
    a, b = (load_weights(tmp_path / f"out{i}" / "lora" / "lora.safetensors") for i in range(2))
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
    for p in checkpoints(tmp_path / "cache"):
        assert checkpoint.check(p, verify=True)[1] is None
    assert not list(checkpoints(tmp_path / "cache")[0].parent.glob(".ckpt-*"))
