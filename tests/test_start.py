"""A cheaper start: the ``prepare_run`` hook, the flux plugin's background imports and read-ahead (never on
validate), loading straight to the GPU when allowed, and ``fluxkiln warmup``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fluxkiln.engine import hookimpl
from helpers.recipes import load_tiny, recipe_text, red_cube

TEST_IMAGES = '[recipe]\nname = "t"\n[nodes.a]\ntype = "test_images"\n'


def flux(model: str) -> str:
    """load_model of ``model`` -> one small sample."""
    return recipe_text("f", load_tiny(model=model), red_cube(steps=2, seed=1))


def py(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "FLUXKILN_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                          cwd=tmp_path, timeout=300)


def test_hook_prepare_run(run_recipe, validate_recipe):
    seen = []

    class Plugin:
        __name__ = "prep"

        @hookimpl
        def prepare_run(self, recipe):
            seen.append(sorted(recipe.nodes))

    class Broken:
        __name__ = "broken-prep"

        @hookimpl
        def prepare_run(self, recipe):
            raise RuntimeError("no preparation today")

    assert validate_recipe(TEST_IMAGES, plugins=[Plugin()]) == []
    assert seen == []  # validation never prepares a run
    run_recipe(TEST_IMAGES, plugins=[Plugin(), Broken()])  # a failing preparation does not stop the run
    assert seen == [["a"]]


def test_validate_imports_nothing_heavy_and_starts_no_thread(tmp_path):
    (tmp_path / "f.toml").write_text(flux("builtin:tiny-flux"))
    code = """
        import sys, threading
        from fluxkiln.engine.registry import Registry
        from fluxkiln.engine.validate import check_file
        check_file("f.toml", Registry.load())
        heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        print(heavy, [t.name for t in threading.enumerate() if t.name.startswith("fluxkiln-")])
        """
    proc = py(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] []"


def test_a_flux_run_imports_in_the_background_and_reads_model_files_ahead(tmp_path):
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\0" * 64)
    (tmp_path / "f.toml").write_text(flux("model"))
    (tmp_path / "t.toml").write_text(TEST_IMAGES)
    code = """
        import os, sys, threading, time
        advised = []
        real = os.posix_fadvise
        os.posix_fadvise = lambda fd, off, n, how: advised.append(os.readlink(f"/proc/self/fd/{fd}"))
        from fluxkiln.engine.recipe import load_recipe
        from fluxkiln.plugins.flux import warm
        plain, _ = load_recipe("t.toml")
        print(warm.start(plain), "torch" in sys.modules)
        recipe, _ = load_recipe("f.toml")
        print(warm.start(recipe))
        waited = warm.wait_imports()
        time.sleep(0.2)
        print(sorted(waited), all(m in sys.modules for m in warm.MODULES), advised, warm.wait_imports())
        """
    proc = py(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "False False"  # no FLUX node: nothing starts
    assert lines[1] == "True"
    assert lines[2] == f"['import_s', 'waited_s'] True {[str(weights)]!r} None"
    off = py(code, tmp_path, FLUXKILN_PREWARM="0")
    assert off.stdout.strip().splitlines()[1] == "False"


def test_run_logs_the_background_imports_and_exits_without_teardown(tmp_path):
    (tmp_path / "f.toml").write_text(flux("builtin:tiny-flux"))
    code = """
        import atexit, sys
        atexit.register(lambda: print("TEARDOWN", flush=True))
        sys.argv = ["fluxkiln", "run", "f.toml", "--json"]
        sys.modules.pop("coverage", None)  # (under a coverage run: it would keep the teardown)
        from fluxkiln.engine.cli import entry
        entry()
        """
    proc = py(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    logs = [json.loads(line) for line in lines if line.startswith("{")]
    messages = [e["message"] for e in logs if e["event"] == "node_log" and e.get("node") == "base"]
    assert any("imported in the background" in m for m in messages), messages
    assert logs[-1]["event"] == "run_finished" and lines[-1].startswith("{")  # flushed, and no teardown ran
    assert "TEARDOWN" not in proc.stdout


def test_fast_exit_only_after_a_single_process_run_with_torch(monkeypatch):
    import torch  # noqa: F401 - imported, as after any FLUX run

    from fluxkiln.engine import cli

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.delitem(sys.modules, "coverage", raising=False)
    for var in ("FLUXKILN_FAST_EXIT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cli.fast_exit(1, ["run", "r.toml"])
    assert exits == [1]
    cli.fast_exit(0, ["validate", "r.toml"])
    cli.fast_exit(0, ["run", "r.toml", "--gpus", "2"])
    monkeypatch.setenv("RANK", "0")
    cli.fast_exit(0, ["run", "r.toml"])
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("FLUXKILN_FAST_EXIT", "0")
    cli.fast_exit(0, ["run", "r.toml"])
    monkeypatch.delenv("FLUXKILN_FAST_EXIT")
    monkeypatch.setitem(sys.modules, "wandb", object())
    cli.fast_exit(0, ["run", "r.toml"])
    assert exits == [1]


def test_weights_load_straight_to_the_gpu_only_when_the_whole_pipeline_goes_there(monkeypatch):
    from fluxkiln.plugins.flux.load import direct_device

    assert direct_device("cuda", "none", {}) == "cuda"
    assert direct_device("cpu", "none", {}) is None
    assert direct_device("cuda", "model", {}) is None
    assert direct_device("cuda", "none", {"vae": object()}) is None
    monkeypatch.setenv("FLUXKILN_LOAD_DIRECT", "0")
    assert direct_device("cuda", "none", {}) is None


def test_warmup_runs_each_sample_at_one_step_and_keeps_nothing(tmp_path):
    (tmp_path / "f.toml").write_text(flux("builtin:tiny-flux").replace("num_inference_steps = 2",
                                                                       "num_inference_steps = 28"))
    env = {**os.environ, "FLUXKILN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "fluxkiln", "warmup", "f.toml"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 sample node(s) compiled" in proc.stdout
    assert not (tmp_path / "runs").exists()
    (tmp_path / "bad.toml").write_text(flux("builtin:tiny-flux") + "cache_threshold = 5\n")
    bad = subprocess.run([sys.executable, "-m", "fluxkiln", "warmup", "bad.toml"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert bad.returncode == 2 and "cache_threshold" in bad.stderr


def test_sample_logs_how_long_compilation_took(monkeypatch):
    from types import SimpleNamespace

    from fluxkiln.plugins.flux import fast
    from fluxkiln.plugins.flux import sample as sample_module

    # this torch says how long it compiled
    assert set(fast.compile_seconds()) == {"compile", "inductor", "saved", "waited", "waited_s"}
    logs = []
    ctx = SimpleNamespace(log=lambda message, **_kw: logs.append(message))
    monkeypatch.setattr(fast, "compile_seconds", lambda: {"compile": 10.0, "inductor": 3.0, "saved": 2.0})
    sample_module._log_compile(ctx, {"compile": 2.0, "inductor": 1.0, "saved": 2.0}, 0.1, {})
    assert logs == ["torch.compile: 8.0 s in this call (Inductor 2.0 s; from the compile cache where it was warm)"]
    sample_module._log_compile(ctx, {"compile": 2.0, "inductor": 1.0, "saved": 0.0}, 0.1, {})
    assert logs[-1] == ("torch.compile: 8.0 s in this call (Inductor 2.0 s; from the compile cache where it was "
                        "warm); 2 variant(s) saved precompiled for later processes")
    sample_module._log_compile(ctx, {"compile": 9.8, "inductor": 3.0, "saved": 2.0}, 0.1, {})  # nothing to say
    sample_module._log_compile(ctx, {}, 0.1, {})  # not on a GPU
    assert len(logs) == 2
    monkeypatch.setattr(fast, "compile_seconds", lambda: {"compile": 0.1, "inductor": 0.0, "saved": 0.0,
                                                          "waited": 2.0, "waited_s": 7.25})
    sample_module._log_compile(ctx, {"compile": 0.1, "inductor": 0.0, "saved": 0.0, "waited": 0.0, "waited_s": 0.0},
                               0.1, {})  # the helpers compiled both variants: this call waited and loaded them
    assert logs[-1] == ("waited 7.2 s for 2 block variant(s) that helper processes compiled while the model loaded "
                        "(loaded, not compiled here)")


def test_build_pipeline_loads_through_device_map_and_falls_back(monkeypatch, tmp_path):
    from fluxkiln.plugins.flux import load
    from fluxkiln.plugins.flux.tiny import tiny_flux_path

    monkeypatch.setenv("FLUXKILN_CACHE", str(tmp_path / "cache"))
    src = load.Source("folder", tiny_flux_path("dev"), "builtin:tiny-flux")
    asked = []
    real = load._load_parts

    def spy(src, dtype, parts, device_map=None):
        asked.append(device_map)
        return real(src, dtype, parts, device_map)

    monkeypatch.setattr(load, "_load_parts", spy)
    monkeypatch.setattr(load, "direct_device", lambda *_a: "cpu")  # the device_map path, for real, on a CPU
    pipe = load.build_pipeline(src, "auto", "cpu", "none", "none")
    assert asked == ["cpu"] and pipe.transformer.device.type == "cpu"
    monkeypatch.setattr(load, "direct_device", lambda *_a: "no-such-device")  # diffusers refuses it
    asked.clear()
    pipe = load.build_pipeline(src, "auto", "cpu", "none", "none")
    assert asked == ["no-such-device", None] and pipe.transformer is not None  # loaded through CPU memory instead


def test_a_package_without_bytecode_python_will_not_write_is_named_with_the_fix(tmp_path, monkeypatch):
    import py_compile

    from fluxkiln.plugins.flux import warm

    pkg = tmp_path / "site" / "nobytecode"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    said = warm.bytecode_missing("nobytecode")
    assert said is not None and "PYTHONDONTWRITEBYTECODE" in said
    assert f"python -m compileall -q {tmp_path / 'site'}" in said
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert warm.bytecode_missing("nobytecode") is None  # Python writes it on the first import
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    py_compile.compile(str(pkg / "__init__.py"))  # compiled once: nothing to say
    assert warm.bytecode_missing("nobytecode") is None
    assert warm.bytecode_missing("no_such_module_here") is None
