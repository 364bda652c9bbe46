"""Precompiled transformer blocks (``fluxkiln warmup``'s files): one process records and saves each block variant;
a new process loads them and runs its first forward without tracing, identical to eager; calls that do not match
(gradients on, other shapes, a block changed or hooked since) and broken files fall back to ordinary compilation.

The product compiles only on a GPU; on CPU the same module runs with Inductor's CPU backend, so these tests use
the module's API on a small FLUX transformer (diffusers' own block classes) in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fluxkiln.plugins.flux import precompiled, variantkeys

MODEL = textwrap.dedent('''
    import json, os, sys, torch
    from diffusers import FluxTransformer2DModel
    from fluxkiln.plugins.flux import fast, precompiled, variantkeys
    torch._dynamo.config.enable_aot_compile = False  # torch 2.11's default: saving and loading must not need it
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    def inputs(tokens=64):
        g = torch.Generator().manual_seed(1)
        return dict(hidden_states=torch.randn(1, tokens, 8, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
                    pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                    guidance=torch.tensor([3.0]), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(8, 3),
                    joint_attention_kwargs={}, return_dict=False)  # {}: what FluxPipeline passes its blocks
    with torch.no_grad():
        eager = tr(**inputs())[0]
''')

SAVE = MODEL + textwrap.dedent('''
    fast.compile_blocks(tr)  # as sample does on a GPU: each new variant is compiled ahead of time and saved
    with torch.no_grad():
        out = tr(**inputs())[0]
    first = precompiled.stats()
    with torch.no_grad():  # the same calls again: served, nothing new to save
        again = tr(**inputs())[0]
    print(json.dumps({"first": first, "again": precompiled.stats()["saved"] == first["saved"],
                      "same": torch.allclose(out, eager, atol=1e-5), "identical": torch.equal(out, again)}))
''')

LOAD = MODEL + textwrap.dedent('''
    from torch._dynamo.utils import calculate_time_spent
    from fluxkiln.plugins.flux import joined
    (variantkeys.folder("cpu") / "junk.bin").write_bytes(b"not a compiled function")  # the newest file
    precompiled.PRELOAD = 2  # the background load takes the junk and one variant; the other loads on demand
    fast.compile_blocks(tr)
    preloaded = precompiled.stats()["loaded"]
    blocks = fast.blocks(tr)
    with torch.no_grad():
        out = tr(**inputs())[0]
    calls = [joined.inner(b._compiled_call_impl) for b in blocks]
    res = {"stats": precompiled.stats(), "served": [c.served for c in calls], "preloaded": preloaded,
           "dispatch": all(isinstance(c, precompiled.Dispatch) for c in calls),
           "traced": calculate_time_spent().get("entire_frame_compile", 0.0),
           "same": torch.allclose(out, eager, atol=1e-5)}
    # the fallbacks, through a Dispatch whose ordinary path says so (the second single block: strided inputs)
    block, seen = blocks[2], {}
    hook = block.register_forward_pre_hook(lambda m, a, k: seen.setdefault("call", (a, k)), with_kwargs=True)
    with torch.no_grad():
        tr(**inputs())
    hook.remove()
    args, kwargs = seen["call"]
    d = precompiled.Dispatch(block, lambda *a, **k: "ordinary", precompiled.table("cpu"))
    def via(grad=False):
        with torch.set_grad_enabled(grad):
            return "ordinary" if isinstance(d(*args, **kwargs), str) else "precompiled"
    res["plain"] = via()
    res["grad"] = via(grad=True)
    h = block.register_forward_hook(lambda *a: None)
    res["hooked"] = via()
    h.remove()
    wide = dict(kwargs, hidden_states=torch.randn(1, 96, kwargs["hidden_states"].shape[-1]))
    with torch.no_grad():
        res["other_shape"] = "ordinary" if isinstance(d(*args, **wide), str) else "precompiled"
    res["again"] = via()
    class Tagged(torch.nn.Linear):
        pass
    old = block.proj_out
    block.proj_out = Tagged(old.in_features, old.out_features)  # a block changed after its check
    res["changed"] = via()
    block.proj_out = old
    res["restored"] = via()
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry as registry
    default, registry._active_backend = registry._active_backend, AttentionBackendName._NATIVE_MATH
    res["other_attention"] = via()  # diffusers' default attention backend changed since the check
    registry._active_backend = default
    from diffusers.hooks import HookRegistry, ModelHook
    registry = HookRegistry.check_if_exists_or_initialize(block)
    registry.register_hook(ModelHook(), "probe")  # diffusers' hooks replace the block's forward
    res["diffusers_hook"] = via()
    registry.remove_hook("probe")
    vars(block).pop("forward", None)
    res["unhooked"] = via()
    from fluxkiln.plugins.flux.stepcache import step_cache
    with torch.no_grad(), step_cache(tr, 1.0) as count, tr.cache_context("cond"):
        cached = [tr(**inputs())[0] for _ in range(2)]  # the same step twice: the second reuses the first
    res["step_cache"] = [count.computed, count.skipped, torch.allclose(cached[0], eager, atol=1e-5)]
    training = type(tr).from_config(tr.config)
    fast.compile_blocks(training, saved=False)  # training's compile: the saved variants serve inference only
    res["training_dispatch"] = any(isinstance(b._compiled_call_impl, precompiled.Dispatch)
                                   for b in fast.blocks(training))
    os.environ["FLUXKILN_PRECOMPILE"] = "0"
    precompiled.forget()
    res["off"] = len(precompiled.table("cpu"))
    print(json.dumps(res))
''')


def _run(code: str, cache) -> dict:
    env = dict(os.environ, FLUXKILN_CACHE=str(cache))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(400)  # two fresh processes compiling with Inductor's CPU backend
@pytest.mark.skipif(not precompiled.supported(), reason=str(precompiled.unavailable()))
def test_blocks_save_their_variants_as_they_compile_and_a_new_process_runs_them_without_tracing(tmp_path):
    saved = _run(SAVE, tmp_path / "cache")
    # one double-stream variant and one single-stream variant: the first single block is called with the layout
    # of the others (views of one joined tensor), so the three blocks compile two variants, not three
    names = sorted(k.split("-")[0] for k in saved["first"]["saved"])
    assert names == ["FluxSingleTransformerBlock", "FluxTransformerBlock"], saved
    assert saved["first"]["failed"] == [] and saved["first"]["loaded"] == 0 and saved["first"]["ahead_s"] > 0
    assert saved["again"] and saved["same"] and saved["identical"]
    assert len(list((tmp_path / "cache" / "precompiled").glob("*/*.bin"))) == 2
    assert not list((tmp_path / "cache" / "precompiled").glob("*/.*"))  # no partial file left behind
    # Inductor's cache is fluxkiln's, not torch's default (which importing diffusers fills in)
    assert any(p.is_file() for p in (tmp_path / "cache" / "inductor").rglob("*"))

    loaded = _run(LOAD, tmp_path / "cache")
    assert loaded["preloaded"] == 1 and loaded["stats"]["loaded"] == 2, loaded  # one in the background, one later
    assert loaded["stats"]["errors"] == ["junk.bin: UnpicklingError"], loaded
    assert loaded["stats"]["saved"] == []  # everything it needed was on disk
    assert loaded["dispatch"] and loaded["served"] == [1, 1, 1]
    assert loaded["traced"] == 0.0  # no Dynamo frame was compiled in this process
    assert loaded["same"]
    assert loaded["plain"] == "precompiled" and loaded["again"] == "precompiled"
    assert loaded["grad"] == "ordinary" and loaded["hooked"] == "ordinary" and loaded["other_shape"] == "ordinary"
    assert loaded["changed"] == "ordinary" and loaded["restored"] == "precompiled"
    assert loaded["other_attention"] == "ordinary"
    assert loaded["diffusers_hook"] == "ordinary" and loaded["unhooked"] == "precompiled"
    assert loaded["step_cache"] == [1, 1, True]  # the cache's hooks run on compiled blocks (served ones skipped them)
    assert loaded["training_dispatch"] is False
    assert loaded["off"] == 0



SAVE_FP8 = MODEL + textwrap.dedent('''
    fast.fp8_apply(tr)  # go_fast's float8 layers (emulated on a CPU)
    fast.compile_blocks(tr)
    with torch.no_grad():
        tr(**inputs())
    print(json.dumps(precompiled.stats()))
''')


@pytest.mark.timeout(400)
@pytest.mark.skipif(not precompiled.supported(), reason=str(precompiled.unavailable()))
def test_go_fast_blocks_with_fp8_layers_are_saved_too(tmp_path):
    """go_fast swaps float8 layers into the blocks; torch packages a block with the classes of its modules, so
    those must be importable (a class made inside a function was: no go_fast block was ever saved on a GPU)."""
    saved = _run(SAVE_FP8, tmp_path / "cache")
    assert len(saved["saved"]) == 2 and saved["failed"] == [], saved


def test_variant_names_depend_on_the_call_and_the_block_and_are_stable():
    import torch

    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.zeros(2, 4)
    sig = variantkeys.call_signature((x,), {"scale": 1.0, "extra": None})
    assert sig == variantkeys.call_signature((torch.ones(2, 4),), {"extra": None, "scale": 1.0})
    assert sig != variantkeys.call_signature((torch.zeros(3, 4),), {"scale": 1.0, "extra": None})
    assert sig != variantkeys.call_signature((torch.zeros(4, 2).t(),), {"scale": 1.0, "extra": None})  # strides
    assert sig != variantkeys.call_signature((x,), {"scale": 2.0, "extra": None})
    assert variantkeys.call_signature((x,), {"cb": object()}) is None  # not describable: not served
    assert variantkeys.call_signature((x,), {"kw": {}}) is not None  # a pipeline's joint_attention_kwargs
    assert variantkeys.call_signature((x,), {"kw": {"scale": 1.0}}) != variantkeys.call_signature((x,), {"kw": {}})
    key = variantkeys.variant_key(block, sig)
    assert key == variantkeys.variant_key(torch.nn.Sequential(torch.nn.Linear(4, 4)), sig)
    assert key != variantkeys.variant_key(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), sig)
    assert key.startswith("Sequential-")


@pytest.mark.parametrize("ahead", [False, True])
def test_a_precompiled_function_that_fails_falls_back_for_good_with_a_warning(ahead, fresh_cache):
    import torch

    block = torch.nn.Linear(4, 4)
    x = torch.zeros(2, 4)
    key = variantkeys.variant_key(block, variantkeys.call_signature((x,), {}))

    class Broken:
        calls = 0

        def guard_check(self, *args, **kwargs):
            return True

        def __call__(self, *args, **kwargs):
            Broken.calls += 1
            raise RuntimeError("stale kernel")

    d = precompiled.Dispatch(block, lambda *a, **k: "ordinary", {key: Broken()}, ahead=ahead)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="stale kernel"):
        assert d(x) == "ordinary"
    with torch.no_grad():  # not tried again, nor compiled ahead in its place
        assert d(x) == "ordinary" and Broken.calls == 1 and d.served == 0
    assert not list(variantkeys.folder("cpu").glob("*"))
    assert any("stale kernel" in e for e in precompiled.stats()["call_errors"])


class _Saved:
    """A stand-in precompiled function: counts its guard checks and calls."""

    def __init__(self) -> None:
        self.checks = self.calls = 0

    def guard_check(self, *args, **kwargs):
        self.checks += 1
        return True

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return "precompiled"


def test_a_block_with_lora_layers_is_never_served_even_by_a_matching_variant():
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), block)
    x = torch.zeros(2, 4)
    saved = _Saved()
    d = precompiled.Dispatch(block, lambda *a, **k: "ordinary",
                             {variantkeys.variant_key(block, variantkeys.call_signature((x,), {})): saved})
    with torch.no_grad():
        assert d(x) == "ordinary" and saved.calls == 0  # adapter scales are not in the saved guards


def test_the_cheap_check_is_redone_after_any_module_changes():
    import torch

    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.zeros(2, 4)
    saved = _Saved()
    d = precompiled.Dispatch(block, lambda *a, **k: "ordinary",
                             {variantkeys.variant_key(block, variantkeys.call_signature((x,), {})): saved})
    with torch.no_grad():
        assert [d(x), d(x)] == ["precompiled", "precompiled"] and saved.checks == 1  # checked once
        block[0] = torch.nn.Linear(4, 4)  # same type and shape: new weights, checked again, still served
        assert d(x) == "precompiled" and saved.checks == 2
        block.to(torch.float64)  # parameters' dtype changed: checked again
        assert d(x.double()) == "ordinary"  # another signature: no saved variant
        d(x)  # the known signature again: the full check runs again (a real one rejects float64 parameters)
        assert saved.checks == 3


def test_a_torch_without_aot_compile_is_found_out_once_saves_nothing_and_warmup_says_what_it_needs(
        fresh_cache, tmp_path, monkeypatch, capsys):
    import torch

    from fluxkiln.engine.cli import main as cli_main
    from helpers.recipes import load_tiny, recipe_text, red_cube

    real, made = torch.compile, []

    def without_aot_compile(fn, **kwargs):  # torch 2.11: compiled functions have no `aot_compile`
        made.append(fn)
        compiled = real(fn, **kwargs)
        return lambda *a, **k: compiled(*a, **k)

    monkeypatch.setattr(torch, "compile", without_aot_compile)
    precompiled.supported.cache_clear()
    monkeypatch.setattr(precompiled, "_state", {})
    try:
        assert not precompiled.supported() and not precompiled.supported() and len(made) == 1  # checked once
        why = precompiled.unavailable()
        assert why == f"torch {torch.__version__} cannot precompile: it needs {precompiled.NEEDS}"
        with precompiled.Recording():
            assert precompiled.recording()  # warmup still compiles the VAE decoder meanwhile
        assert not precompiled.recording()
        from fluxkiln.plugins.flux import fast

        model = torch.nn.Module()
        model.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
        assert fast.compile_blocks(model) == 1 and len(made) == 2  # the probe, then the block's torch.compile
        assert not isinstance(model.transformer_blocks[0]._compiled_call_impl, precompiled.Dispatch)
        assert not variantkeys.folder("cpu").exists()
        assert precompiled.start_preload("cpu") is False and precompiled.table("cpu") == {}

        path = tmp_path / "w.toml"
        path.write_text(recipe_text("w", load_tiny(), red_cube(steps=2, seed=1)))
        assert cli_main(["warmup", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"nothing saved precompiled ({why})" in out and "newly saved" not in out
    finally:
        precompiled.supported.cache_clear()  # the next caller checks the real torch.compile


@pytest.mark.skipif(not precompiled.supported(), reason=str(precompiled.unavailable()))
def test_a_variant_that_cannot_be_compiled_ahead_is_compiled_as_usual_and_not_tried_again(fresh_cache, monkeypatch):
    import torch

    class Breaks(torch.nn.Linear):
        """A block torch cannot compile as one graph, so cannot package ahead of time."""

        def forward(self, x):
            torch._dynamo.graph_break()
            return super().forward(x)

    monkeypatch.setattr(precompiled, "_state", {})
    block, x = Breaks(4, 4), torch.zeros(2, 4)
    d = precompiled.Dispatch(block, lambda *a, **k: "ordinary", {}, ahead=True)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="is compiled as usual"):
        assert d(x) == "ordinary"
    failed = list(variantkeys.folder("cpu").glob("*.failed"))
    assert len(failed) == 1 and failed[0].name.startswith("Breaks-") and failed[0].read_text().strip()
    assert precompiled.stats()["failed"] and precompiled.stats()["saved"] == []
    assert not list(variantkeys.folder("cpu").glob("*.bin"))
    tries = []
    monkeypatch.setattr(torch, "compile", lambda *a, **k: tries.append(a))
    again = precompiled.Dispatch(block, lambda *a, **k: "ordinary", {}, ahead=True)  # as in a later process
    with torch.no_grad():
        assert again(x) == "ordinary" and tries == []  # the failure file says not to try


@pytest.mark.skipif(not precompiled.supported(), reason=str(precompiled.unavailable()))
def test_a_variant_that_compiles_but_cannot_be_written_is_used_and_saved_by_a_later_process(fresh_cache, monkeypatch):
    import torch

    monkeypatch.setattr(precompiled, "_state", {})
    block, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    where, real_replace = variantkeys.folder("cpu"), precompiled.os.replace

    def full_disk(src, dst, *args, **kwargs):  # only the variant's file: Inductor writes its own cache the same way
        if Path(dst).parent == where and str(dst).endswith(".bin"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    d = precompiled.Dispatch(block, lambda *a, **k: "ordinary", {}, ahead=True)
    with monkeypatch.context() as m, torch.no_grad(), \
            pytest.warns(RuntimeWarning, match="not saved, so a later process compiles it again"):
        m.setattr(precompiled.os, "replace", full_disk)
        out = d(x)
    assert torch.allclose(out, block(x).detach()) and d.served == 1  # compiled once, and used
    assert not list(where.glob("*.bin")) and not list(where.glob("*.failed")) and not list(where.glob(".*"))
    monkeypatch.setattr(precompiled, "_state", {})  # the disk has room again: a later process saves it
    again = precompiled.Dispatch(block, lambda *a, **k: "ordinary", {}, ahead=True)
    with torch.no_grad():
        again(x)
    assert len(list(where.glob("*.bin"))) == 1 and precompiled.stats()["saved"]


@pytest.mark.skipif(not precompiled.supported(), reason=str(precompiled.unavailable()))
def test_loading_saved_variants_looks_for_their_kernels_in_fluxkiln_s_compile_cache(fresh_cache, monkeypatch):
    """``load_model`` starts loading the saved variants before anything compiles; their kernels are in fluxkiln's
    compile cache, so the loading must look there, not in torch's default folders (where it found none and
    compiled them again)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setattr(precompiled, "_state", {})
    assert precompiled.start_preload("cpu")
    assert precompiled.table("cpu") == {}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(fresh_cache / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(fresh_cache / "inductor" / "triton")


@pytest.mark.skipif(not precompiled.supported(), reason=str(precompiled.unavailable()))
def test_the_background_load_takes_the_most_recently_used_variants_and_use_makes_one_recent(fresh_cache,
                                                                                             monkeypatch):
    monkeypatch.setattr(precompiled, "_state", {})
    monkeypatch.setattr(precompiled, "PRELOAD", 2)
    where = variantkeys.folder("cpu")
    where.mkdir(parents=True)
    for age, name in enumerate(["new", "middle", "old"]):
        path = where / f"{name}.bin"
        path.write_bytes(b"broken")  # a load that fails names the file it tried
        os.utime(path, (1e9 - age * 100, 1e9 - age * 100))
    assert precompiled.table("cpu") == {}
    assert precompiled.stats()["errors"] == ["new.bin: UnpicklingError", "middle.bin: UnpicklingError"]
    precompiled.used(where, "old")  # served in this process: the next one loads it in the background
    assert max(where.glob("*.bin"), key=lambda p: p.stat().st_mtime).name == "old.bin"
    assert precompiled.load_saved(where, "old", {}) is None  # on demand: broken, noted, compiled as usual
    assert precompiled.load_saved(where, "absent", {}) is None
    assert precompiled.stats()["errors"][-1] == "old.bin: UnpicklingError"


def test_saved_variants_live_in_a_folder_keyed_by_the_plugin_s_code(tmp_path):
    code = tmp_path / "flux"
    code.mkdir()
    (code / "context.py").write_text("def attention(q, k, v): ...\n")
    first = variantkeys.code_hash(code)
    assert variantkeys.code_hash(code) == first and len(first) == 16
    variantkeys.code_hash.cache_clear()
    (code / "context.py").write_text("def attention(q, k, v): return q\n")  # an upgrade changes traced code
    assert variantkeys.code_hash(code) != first
    assert variantkeys.environment("cpu")["fluxkiln"] == variantkeys.code_hash()  # this plugin's own files
