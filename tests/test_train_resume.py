"""train_lora checkpoints: cancel + rerun resumes bit for bit, a failed write keeps the last checkpoint,
raising steps continues a finished run."""

from __future__ import annotations

import torch
from test_train_support import FAST, checkpoints, failure, load_weights, losses, run, solid_dataset, write_recipe

from fluxkiln.engine.runner import Engine
from fluxkiln.plugins.train import checkpoint

SETUP = dict(steps=6, save_every=2, keep_last=2, batch_size=2, caption_dropout_rate=0.3)


def _lora(result):
    return result.outputs["lora"]["lora"]


def _same_weights(a, b) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert sorted(wa) == sorted(wb) and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def _close_weights(a, b, lr: float) -> None:
    """Bit for bit on a CPU.  A GPU trains in bfloat16 with compiled blocks (recomputed with other fusions under
    gradient checkpointing) and backward reductions that are not bit-exact, and AdamW's first steps amplify that:
    a step moves each weight by about +-lr whatever the gradient's size (m / sqrt(v) is its sign at step one), so
    a gradient component near zero whose rounding flips its sign moves its weight 2 lr the other way.  A lora_B
    starts at zero, so after 3 steps two such flips among its 128 elements are 13 % of its norm (seen on an
    H200: 0.0028 = 2 * sqrt(2) * lr of 0.0218).  So on a GPU a few elements may be apart by whole steps, but no
    more than 10 % of any tensor may be over half a step apart; a setting that changed the training would
    change the gradients' direction and move most of them."""
    if not torch.cuda.is_available():
        _same_weights(a, b)
        return
    wa, wb = load_weights(a), load_weights(b)
    assert sorted(wa) == sorted(wb) and wa
    for k in wa:
        apart = ((wa[k].float() - wb[k].float()).abs() > lr / 2).float().mean().item()
        assert apart <= 0.10, f"{k}: {apart:.1%} of its elements differ by more than half a step"


def _logs(result) -> str:
    return "\n".join(e.data["message"] for e in result.events if e.event == "node_log" and e.node == "lora")


def test_cancelled_then_resumed_run_equals_uninterrupted_run(tmp_path):
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, **SETUP)
    straight = run(recipe, tmp_path / "cache-a", tmp_path / "out-a")
    assert straight.ok, straight.nodes

    cache = tmp_path / "cache-b"
    engine = Engine(cache_dir=cache)
    first = run(recipe, cache, tmp_path / "out-b", engine=engine, cancel_at=3)
    assert first.status == "cancelled" and first.nodes["lora"] == "cancelled"
    assert [p.name for p in checkpoints(cache)] == ["ckpt-000002", "ckpt-000003"]  # step 3 written on cancel
    assert max(e.data["step"] for e in first.events if e.event == "node_progress" and e.node == "lora") == 3

    resumed = run(recipe, cache, tmp_path / "out-b")  # a new engine: as after a restart
    assert resumed.ok, resumed.nodes
    assert "resuming from checkpoint at step 3" in _logs(resumed)
    assert losses(resumed) == losses(straight)[3:]
    _same_weights(_lora(straight).path, _lora(resumed).path)
    # keep_last = 2: only the newest two complete checkpoints remain
    assert [p.name for p in checkpoints(cache)] == ["ckpt-000004", "ckpt-000006"]


def test_failed_checkpoint_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, **SETUP)
    cache = tmp_path / "cache"
    real = checkpoint._write_file

    def disk_full_at_step_4(path, data_bytes):
        if "ckpt-000004" in path.parent.name and path.name == checkpoint.STATE:
            with open(path, "xb") as fh:
                fh.write(data_bytes[: len(data_bytes) // 2])
            raise OSError(28, "No space left on device")
        return real(path, data_bytes)

    monkeypatch.setattr(checkpoint, "_write_file", disk_full_at_step_4)
    broken = run(recipe, cache, tmp_path / "out")
    err = failure(broken)
    assert "could not write the checkpoint at step 4" in err["error"]
    assert "checkpoint at step 2 is intact" in err["error"] and "free disk space" in err["hint"]
    assert [p.name for p in checkpoints(cache)] == ["ckpt-000002"]
    assert not list(cache.glob("state/*/checkpoints/.ckpt-*")), "half-written checkpoint left behind"
    found = checkpoint.load_latest(checkpoints(cache)[0].parent, 100)
    assert found is not None and found.step == 2

    monkeypatch.setattr(checkpoint, "_write_file", real)
    again = run(recipe, cache, tmp_path / "out")
    assert again.ok and "resuming from checkpoint at step 2" in _logs(again)


def test_incomplete_checkpoint_folder_is_never_used(tmp_path):
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=4, save_every=2)
    cache = tmp_path / "cache"
    assert run(recipe, cache, tmp_path / "out").ok
    root = checkpoints(cache)[0].parent
    newest = root / "ckpt-000004"
    (newest / checkpoint.WEIGHTS).write_bytes(b"truncated")  # size no longer matches meta.json
    assert [s for s, _ in checkpoint.complete(root)] == [2]
    assert checkpoint.load_latest(root, 100).step == 2


def test_raising_steps_continues_the_run(tmp_path):
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=4, save_every=0)
    cache = tmp_path / "cache"
    short = run(recipe, cache, tmp_path / "out")
    assert short.ok and len(losses(short)) == 4
    longer = run(recipe, cache, tmp_path / "out", overrides=["nodes.lora.steps=6"])
    assert longer.ok and longer.nodes["lora"] == "ran"
    assert "resuming from checkpoint at step 4" in _logs(longer)
    assert [e.data["step"] for e in longer.events if e.event == "node_progress" and e.node == "lora"
            and e.data.get("metrics")] == [5, 6]
    straight = run(recipe, tmp_path / "cache-2", tmp_path / "out-2", overrides=["nodes.lora.steps=6"])
    _same_weights(_lora(straight).path, _lora(longer).path)
    meta = _lora(longer).meta
    assert meta["fluxkiln.steps"] == "6" and "#   --set nodes.lora.steps=6" in meta["fluxkiln.recipe"]

    # Forced with resume = "always", a finished configuration trains nothing more.
    again = Engine(cache_dir=cache).run(recipe, output=tmp_path / "out", force=["lora"],
                                        overrides=["nodes.lora.steps=6", "nodes.lora.resume=always"])
    assert again.ok and again.nodes["lora"] == "ran" and losses(again) == []
    assert "resuming from checkpoint at step 6" in _logs(again)
    _same_weights(_lora(longer).path, _lora(again).path)
    assert len((again.run_dir / "lora" / "metrics.csv").read_text().splitlines()) == 7


def test_force_retrains_from_scratch_and_resume_never_too(tmp_path):
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=4, save_every=2)
    cache = tmp_path / "cache"
    first = run(recipe, cache, tmp_path / "out")
    assert "training from scratch (no checkpoint of this configuration yet)" in _logs(first)
    forced = Engine(cache_dir=cache).run(recipe, output=tmp_path / "out", force=["lora"])
    assert forced.ok and len(losses(forced)) == 4 and losses(forced) == losses(first)
    assert "training from scratch (the node was forced" in _logs(forced)
    assert "2 earlier checkpoint(s) of this configuration discarded" in _logs(forced)
    _same_weights(_lora(first).path, _lora(forced).path)
    # raising steps resumes by default; resume = "never" trains the whole way again
    more = run(recipe, cache, tmp_path / "out", overrides=["nodes.lora.steps=5"])
    assert len(losses(more)) == 1 and "resuming from checkpoint at step 4" in _logs(more)
    never = run(recipe, cache, tmp_path / "out", overrides=["nodes.lora.steps=5", "nodes.lora.resume=never"])
    assert len(losses(never)) == 5 and 'training from scratch (resume = "never")' in _logs(never)
    _same_weights(_lora(more).path, _lora(never).path)


def test_rate_and_eta_after_a_resume_count_only_this_session(tmp_path):
    from clihelp import events, fluxkiln

    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=12, save_every=0)
    cache = tmp_path / "cache"
    assert run(recipe, cache, tmp_path / "out").ok
    done = fluxkiln("run", str(recipe), "--json", "--set", "nodes.lora.steps=15", "--output",
                    str(tmp_path / "out"), cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr
    ticks = [e for e in events(done.stdout) if e["event"] == "node_progress" and e["node"] == "lora"]
    start = next(e for e in ticks if e.get("message") == "resumed at step 12")
    steps = [e for e in ticks if e.get("metrics")]
    assert [e["step"] for e in steps] == [13, 14, 15] and all(e["resumed_from"] == 12 for e in steps)
    for e in steps:
        true_rate = (e["step"] - 12) / (e["time"] - start["time"])
        assert abs(e["rate"] - true_rate) <= 0.15 * true_rate + 0.05, (e, true_rate)
        assert abs(e["eta"] - (15 - e["step"]) / e["rate"]) < 0.05


def test_ctrl_c_in_the_cli_checkpoints_and_exits_130(tmp_path):
    """SIGINT: the current step finishes, a checkpoint is written, the run ends with exit code 130."""
    import json
    import os
    import signal
    import subprocess
    import sys

    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=500, save_every=0)
    env = {**os.environ, "FLUXKILN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from fluxkiln.engine.cli import main; "
                             "sys.exit(main(sys.argv[1:]))", "run", str(recipe), "--json", "--output",
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    events = []
    try:
        for line in proc.stdout:
            ev = json.loads(line)
            events.append(ev)
            if ev["event"] == "node_progress" and ev.get("node") == "lora" and ev.get("step", 0) >= 2 \
                    and ev.get("metrics"):
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    events += [json.loads(line) for line in rest.splitlines() if line.strip()]
    assert proc.returncode == 130
    last = max(e["step"] for e in events if e["event"] == "node_progress" and e.get("node") == "lora")
    assert last < 500
    assert any(e["event"] == "node_cancelled" and e["node"] == "lora" for e in events)
    assert [p.name for p in checkpoints(tmp_path / "cache")] == [f"ckpt-{last:06d}"]


def test_memory_settings_do_not_change_the_weights(tmp_path):
    """gradient_checkpointing and the latent/text caches trade memory for time only (so they are not part
    of the checkpoint key): on CPU every combination trains the same weights, bit for bit (on a GPU, to within
    bfloat16's rounding)."""
    data = solid_dataset(tmp_path / "data")
    variants = [{}, {"gradient_checkpointing": True}, {"cache_latents": False, "cache_text_embeddings": False},
                {"cache_latents_to_disk": True}]
    results = []
    for i, extra in enumerate(variants):
        recipe = write_recipe(tmp_path / f"r{i}.toml", data, steps=3, **extra)
        result = run(recipe, tmp_path / f"cache{i}", tmp_path / f"out{i}")
        assert result.ok, extra
        results.append(result)
    for other in results[1:]:
        _close_weights(_lora(results[0]).path, _lora(other).path, FAST["learning_rate"])
    assert list((tmp_path / "cache3").glob("state/train_lora-*/latents/*-64x64.safetensors"))
