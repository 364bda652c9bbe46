"""Compiling a run's block variants in helper processes while the run loads (``ahead.py``), and the file locks
that keep two processes from compiling one variant at once (``precompiled.obtain``).

The product starts helpers on a GPU only; the planning, the markers, the locks and a real helper process (on the
CPU, where the same module compiles with Inductor's CPU backend) are tested here through their public functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fluxkiln.engine.runner import Engine
from fluxkiln.plugins.flux import ahead, precompiled
from fluxkiln.plugins.flux.ahead import Shape, Work


def fake_folder(root: Path, guidance: bool = True, max_length: int | None = None) -> Path:
    """A diffusers folder as far as planning reads it: the transformer's config and T5's tokenizer config."""
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": guidance, "num_layers": 19}))
    if max_length is not None:
        (root / "tokenizer_2").mkdir()
        (root / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    (root / "model_index.json").write_text("{}")
    return root


RECIPE = '''
[recipe]
name = "plan"

[nodes.base]
type = "load_model"
model = "dev-folder"

[nodes.plain]
type = "sample"
model = "@base"
prompt = "a fox"

[nodes.listed]
type = "sample"
model = "@base"
prompt = ["a", "b", "c"]
megapixels = "0.25"
num_outputs = 2
go_fast = false

[nodes.swept]
type = "sample"
model = "@base"
prompt = "a fox"
[nodes.swept.sweep]
aspect_ratio = ["1:1", "16:9"]

[nodes.refined]
type = "sample"
model = "@base"
prompt = "a fox"
image = "in.png"

[nodes.cached]
type = "sample"
model = "@base"
prompt = "a fox"
megapixels = "0.25"
cache_threshold = 0.1

[nodes.schnell]
type = "load_model"
model = "schnell-folder"

[nodes.fast]
type = "sample"
model = "@schnell"
prompt = "a fox"
aspect_ratio = "custom"
width = 512
height = 768

[nodes.styled]
type = "apply_lora"
model = "@schnell"
lora = "style.safetensors"

[nodes.with_lora]
type = "sample"
model = "@styled"
prompt = "a fox"
megapixels = "0.25"

[nodes.offloaded]
type = "load_model"
model = "dev-folder"
offload = "model"

[nodes.slow]
type = "sample"
model = "@offloaded"
prompt = "a fox"
megapixels = "0.25"
'''


def recipe(tmp_path: Path, text: str = RECIPE):
    fake_folder(tmp_path / "dev-folder")
    fake_folder(tmp_path / "schnell-folder", guidance=False, max_length=77)
    (tmp_path / "in.png").write_bytes(b"")
    (tmp_path / "style.safetensors").write_bytes(b"")
    (tmp_path / "r.toml").write_text(text)
    return Engine().check(tmp_path / "r.toml").recipe


def test_plan_lists_the_transformer_calls_the_samples_will_make(tmp_path):
    works = ahead.plan(recipe(tmp_path))
    by_folder = {Path(w.folder).name: w for w in works}
    assert set(by_folder) == {"dev-folder", "schnell-folder"}  # the offloaded load_model is left out
    assert by_folder["dev-folder"].dtype == "auto"
    assert by_folder["dev-folder"].shapes == (
        Shape(1024, 1024, 1, 512, True),  # plain (and the first sweep cell: the same call)
        Shape(512, 512, 6, 512, False),  # three prompts x two images of 0.25 MP: one batch
        Shape(1344, 768, 1, 512, True))  # the sweep's 16:9 cell
    # schnell pads to 256 tokens, or to its tokenizer's shorter limit; the sample with a LoRA is left out
    assert by_folder["schnell-folder"].shapes == (Shape(512, 768, 1, 77, True),)


def test_values_known_only_when_running_are_not_planned():
    from fluxkiln.engine.recipe import Link

    defaults = ahead._defaults()
    assert ahead._shapes({"prompt": "a fox"}, defaults, 512) == [Shape(1024, 1024, 1, 512, True)]
    assert ahead._shapes({"prompt": Link("captions")}, defaults, 512) == []  # prompts from another node
    assert ahead._shapes({"prompt": "a fox", "num_outputs": Link("n")}, defaults, 512) == []
    assert ahead._shapes({"prompt": "a fox", "aspect_ratio": "custom"}, defaults, 512) == []  # no width: invalid


def test_plan_splits_batches_as_sample_does(tmp_path):
    text = RECIPE.split("[nodes.listed]")[0] + '''
[nodes.many]
type = "sample"
model = "@base"
prompt = ["a", "b", "c", "d", "e"]
num_outputs = 1
'''
    shapes = ahead.plan(recipe(tmp_path, text))[0].shapes
    assert shapes == (Shape(1024, 1024, 1, 512, True), Shape(1024, 1024, 4, 512, True))  # 4 MP a batch, then 1


def test_markers_change_with_the_work_and_know_when_their_files_are_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXKILN_CACHE", str(tmp_path / "cache"))
    folder = fake_folder(tmp_path / "m")
    work = Work(str(folder), "auto", (Shape(1024, 1024, 1, 512, True),))
    other = Work(str(folder), "auto", (Shape(1024, 1024, 2, 512, True),))
    assert ahead.marker(work, "double") == ahead.marker(work, "double")
    assert len({ahead.marker(work, "double"), ahead.marker(work, "single"), ahead.marker(other, "double")}) == 3
    before = ahead.marker(work, "double")
    (folder / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": True, "num_layers": 2}))
    assert ahead.marker(work, "double") != before  # another model in the same folder
    path = ahead.marker(work, "double")
    assert not ahead.done(path)
    saved = tmp_path / "v.bin"
    saved.write_bytes(b"x")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"files": [str(saved)]}))
    assert ahead.done(path)
    saved.unlink()  # the precompiled folder was cleared: the helpers are needed again
    assert not ahead.done(path)
    path.write_text("{not json")
    assert not ahead.done(path)


def test_start_spawns_one_helper_per_block_kind_unless_done_or_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXKILN_CACHE", str(tmp_path / "cache"))
    r = recipe(tmp_path)
    spawned: list[tuple[str, str]] = []
    monkeypatch.setattr(ahead, "spawn", lambda work, kind, path: spawned.append((Path(work.folder).name, kind)))
    monkeypatch.setattr(ahead, "gpu_present", lambda: True)

    def started() -> list[tuple[str, str]]:
        spawned.clear()
        thread = ahead.start(r)
        if thread is not None:
            thread.join(timeout=30)
        return sorted(spawned)

    assert started() == [("dev-folder", "double"), ("dev-folder", "single"), ("schnell-folder", "double"),
                         ("schnell-folder", "single")]
    for work in ahead.plan(r):  # earlier helpers did it all, and their files are there
        for kind in ahead.KINDS:
            path = ahead.marker(work, kind)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"files": []}))
    assert started() == []
    for path in (tmp_path / "cache" / "precompiled" / "ahead").glob("*.json"):
        path.unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes: not planned for
    assert started() == []
    monkeypatch.delenv("WORLD_SIZE")
    for name in ("FLUXKILN_AHEAD", "FLUXKILN_PRECOMPILE", "FLUXKILN_COMPILE"):
        monkeypatch.setenv(name, "0")
        assert started() == [], name
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLUXKILN_COMPILE_MODE", "reduce-overhead")  # Inductor's graph modes are not precompiled
    assert started() == []
    monkeypatch.delenv("FLUXKILN_COMPILE_MODE")
    monkeypatch.setattr(ahead, "gpu_present", lambda: False)
    assert started() == []


def test_a_recipe_the_planner_cannot_read_starts_no_helper_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXKILN_CACHE", str(tmp_path / "cache"))
    r = recipe(tmp_path)
    (tmp_path / "dev-folder" / "transformer" / "config.json").write_text("{broken")
    spawned: list[str] = []
    monkeypatch.setattr(ahead, "spawn", lambda *a: spawned.append("helper"))
    monkeypatch.setattr(ahead, "gpu_present", lambda: True)
    ahead.start(r).join(timeout=30)
    assert spawned == []
    said = (tmp_path / "cache" / "precompiled" / "ahead" / "planning-error.log").read_text()
    assert said.startswith("JSONDecodeError")


def test_gpu_present_honours_hidden_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not ahead.gpu_present()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not ahead.gpu_present()


# ------------------------------------------------------------------ waiting for another process's compilation
def holder(lock: Path, seconds: float, exit_unreaped: bool = False, saves: Path | None = None) -> subprocess.Popen:
    """A process that holds ``lock`` (as a compiling process does) for ``seconds``, then writes ``saves`` (its
    variant's file) before it lets the lock go; returns once it holds it."""
    ready = lock.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    code = textwrap.dedent(f'''
        import os, time
        from pathlib import Path
        from fluxkiln.engine import locks
        with locks.hold(Path({str(lock)!r}), "a variant"):
            Path({str(ready)!r}).write_text("held")
            time.sleep({seconds})
            if {saves is not None}:
                Path({str(saves)!r}).write_text("saved")
            if {exit_unreaped}:
                os._exit(0)  # ends while holding it, and stays a zombie: nobody reaps it during the test
    ''')
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists()
    return proc


@pytest.fixture
def wait_counters(monkeypatch):
    """This process's counts of waits for other processes' compilations, from 0, as they were after the test."""
    for key in ("waited", "waited_s"):
        monkeypatch.setitem(precompiled._state, key, 0)


def test_a_variant_another_process_is_compiling_is_waited_for_and_loaded_not_compiled(tmp_path, monkeypatch,
                                                                                       wait_counters):
    where = tmp_path / "variants"
    saved = tmp_path / "k.saved"
    compiling = holder(where / "k.lock", 0.6, saves=saved)
    served = object()
    calls: list[str] = []

    def load_saved(w, key, variants):
        calls.append("load")
        return served if saved.exists() else None  # its file appears before it lets the lock go

    monkeypatch.setattr(precompiled, "load_saved", load_saved)
    monkeypatch.setattr(precompiled, "compile_ahead", lambda *a: calls.append("compile"))
    assert precompiled.obtain(None, where, "k", (), {}, {}) is served
    assert "compile" not in calls and precompiled.stats()["waited"] == 1
    assert 0.3 < precompiled.stats()["waited_s"] < 5
    # nobody holds it: compiled here, under the lock (after one more look for a file saved just before)
    calls.clear()
    monkeypatch.setattr(precompiled, "load_saved", lambda *a: calls.append("load"))
    monkeypatch.setattr(precompiled, "compile_ahead", lambda *a: calls.append("compile") or "compiled")
    assert precompiled.obtain(None, where, "k2", (), {}, {}) == "compiled"
    assert calls == ["load", "compile"] and precompiled.stats()["waited"] == 1
    compiling.wait()


def test_a_holder_that_died_or_never_finishes_does_not_hold_the_run_up(tmp_path, monkeypatch, wait_counters):
    where = tmp_path / "variants"
    monkeypatch.setattr(precompiled, "load_saved", lambda *a: None)
    monkeypatch.setattr(precompiled, "compile_ahead", lambda *a: "compiled")
    crashed = holder(where / "k.lock", 0.0, exit_unreaped=True)  # a helper that crashed, not reaped yet
    t0 = time.monotonic()
    assert precompiled.obtain(None, where, "k", (), {}, {}) == "compiled"
    assert time.monotonic() - t0 < 5  # the system released its lock when it ended
    crashed.wait()
    stuck = holder(where / "k.lock", 60)  # one that never finishes: compiled here after the limit
    monkeypatch.setattr(precompiled, "WAIT_LIMIT_S", 0.5)
    t0 = time.monotonic()
    assert precompiled.obtain(None, where, "k", (), {}, {}) == "compiled"
    assert 0.4 < time.monotonic() - t0 < 5
    stuck.kill()
    stuck.wait()


# ------------------------------------------------------------------ a real helper process
MAIN = textwrap.dedent('''
    import json, sys, torch
    from diffusers import FluxPipeline
    from fluxkiln.plugins.flux import fast, pipestate, precompiled
    pipe = FluxPipeline.from_pretrained(sys.argv[1], dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipestate.prepare(pipe, [], True, "cpu", None, fast=True)  # as sample prepares it (fused QKV)
    fast.compile_blocks(pipe.transformer)  # what sample does on a GPU
    tr = pipe.transformer
    with torch.no_grad():
        pipe(prompt_embeds=torch.zeros(2, 16, tr.config.joint_attention_dim),  # two images in one batch
             pooled_prompt_embeds=torch.zeros(2, tr.config.pooled_projection_dim), num_images_per_prompt=1,
             width=64, height=64, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=16,
             output_type="latent")
    print(json.dumps(precompiled.stats()))
''')


@pytest.mark.timeout(300)
@pytest.mark.skipif(not precompiled.supported(), reason=str(precompiled.unavailable()))
def test_helpers_compile_the_very_variants_the_full_model_then_loads(tmp_path, monkeypatch):
    from fluxkiln.plugins.flux.tiny import tiny_flux_path

    monkeypatch.setenv("FLUXKILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    folder = tiny_flux_path("dev")  # a real diffusers folder: 1 double-stream and 2 single-stream blocks
    work = Work(str(folder), "auto", (Shape(64, 64, 2, 16, True),))
    children = [ahead.spawn(work, kind, ahead.marker(work, kind), device="cpu") for kind in ahead.KINDS]
    assert [c.wait(timeout=240) for c in children] == [0, 0]
    files = []
    for kind in ahead.KINDS:
        info = json.loads(ahead.marker(work, kind).read_text())
        assert info["note"] == f"1 variant(s) of {kind}-stream blocks ready", info
        assert ahead.done(ahead.marker(work, kind))
        files += info["files"]
    proc = subprocess.run([sys.executable, "-c", MAIN, str(folder)], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["saved"] == [] and stats["failed"] == []  # nothing compiled ahead in the "run"
    assert sorted(stats["used"]) == sorted(files)  # it ran exactly what the helpers saved


def test_a_helper_ends_with_the_run_that_started_it():
    parent = subprocess.run([sys.executable, "-c", textwrap.dedent('''
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import sys, time; from fluxkiln.plugins.flux import ahead; "
            "ahead._follow_parent(int(sys.argv[1])); time.sleep(60)", str(os.getpid())])
        print(child.pid, flush=True)
        time.sleep(1.0)
        os._exit(0)  # as FLUXKILN_FAST_EXIT leaves: no atexit
    ''')], capture_output=True, text=True, timeout=60)
    pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _state(pid) != "Z":
        time.sleep(0.1)
    assert _state(pid) == "Z", "the helper outlived its run"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def test_stop_ends_helpers_still_running(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(ahead, "_children", [child])
    t0 = time.monotonic()
    ahead.stop(grace_s=5)
    assert child.poll() is not None and time.monotonic() - t0 < 5


def test_the_ahead_module_imports_nothing_heavy():
    code = "import sys; from fluxkiln.plugins.flux import ahead; print([m for m in ('torch', 'diffusers') " \
           "if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
