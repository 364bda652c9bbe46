"""What ``sample`` promises beyond its parameters: context-parallel ranks make the one-process image, a LoRA
that was unloaded to make room is read again (with its warnings) and gives the same image, go_fast's CPU
path, a fuse that cannot keep an exact copy says so, and the errors of its public helpers carry a hint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flux_support import recipe, run, run_body
from PIL import Image
from safetensors.torch import save_file

from fluxkiln.engine.errors import NodeError
from fluxkiln.engine.runner import Engine
from fluxkiln.plugins.flux.pipestate import MAX_LOADED, state_of
from fluxkiln.plugins.flux.sample import check_variant, make_jobs
from helpers.recipes import SQUARE_256, load_tiny, sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = load_tiny()
RANK = 2


def _sample(nid: str, model: str, extra: str = "") -> str:
    return (f'[nodes.{nid}]\ntype = "sample"\nmodel = "@{model}"\nprompt = "a cat"\naspect_ratio = "custom"\n'
            f"width = 256\nheight = 256\nnum_inference_steps = 1\nseed = 5\ngo_fast = false\n{extra}\n")


def _pixels(result, node: str) -> np.ndarray:
    return np.asarray(result.outputs[node]["output"][0].image.convert("RGB")).astype(np.int16)


def _logs(result, node: str) -> list[str]:
    return [e.data.get("message", "") for e in result.events if e.event == "node_log" and e.node == node]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(cache_dir=tmp_path_factory.mktemp("sample-contract-cache"))


def _lora_file(path: Path, seed: int) -> Path:
    """A random LoRA on one layer of the tiny model, plus a layer it does not have (skipped with a warning)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, out_f, in_f in (("single_transformer_blocks.0.proj_out", 32, 160), ("no_such_block.proj", 8, 8)):
        weights[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g)
        weights[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g)
    save_file(weights, path)
    return path


def test_a_lora_unloaded_to_make_room_is_read_again_and_gives_the_same_image(engine, tmp_path):
    n = MAX_LOADED + 1  # one more LoRA than a pipeline keeps loaded: sampling them all unloads one
    body = BASE
    for i in range(n):
        lora = _lora_file(tmp_path / f"l{i}.safetensors", seed=i)
        body += f'[nodes.lora{i}]\ntype = "apply_lora"\nmodel = "@base"\nlora = "{lora}"\n\n'
        body += _sample(f"s{i}", f"lora{i}")
    path = recipe(tmp_path, body)
    first = run(engine, path)
    again = run(engine, path, force=[f"s{i}" for i in range(n)])  # the LoRAs stay applied; the images are made anew
    read_again = [i for i in range(n) if any("were not loaded" in m for m in _logs(again, f"s{i}"))]
    assert read_again, "no LoRA was read again by sample (each one warns about its unknown layer when read)"
    for i in range(n):
        a, b = _pixels(first, f"s{i}"), _pixels(again, f"s{i}")
        if torch.cuda.is_available():  # bfloat16 there; cuDNN/cuBLAS pick another algorithm where the workspace
            # of the first cannot be allocated (a GPU shared by 15 xdist workers): up to 3 levels apart over much of
            # the image on an H200, equal alone; a LoRA not read again would change the image by tens
            assert np.abs(a - b).max() <= 8 and np.abs(a - b).mean() <= 2, f"s{i} changed"
        else:
            assert np.array_equal(a, b), f"s{i} changed"
    assert len({_pixels(first, f"s{i}").tobytes() for i in range(n)}) == n  # every LoRA made its own image


def test_go_fast_fuses_the_attention_projections_on_cpu_too(engine, tmp_path):
    result = run_body(engine, tmp_path, BASE + _sample("s", "base").replace("go_fast = false", "go_fast = true"))
    assert state_of(result.outputs["base"]["output"].get()).qkv_fused


def test_a_fuse_without_room_for_an_exact_copy_warns(engine, tmp_path, monkeypatch):
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=0))  # a machine out of memory
    lora = _lora_file(tmp_path / "f.safetensors", seed=42)
    body = BASE + f'[nodes.fused]\ntype = "apply_lora"\nmodel = "@base"\nlora = "{lora}"\nfuse = true\n\n'
    result = run_body(engine, tmp_path, body + _sample("s", "fused"))
    assert any(m.startswith("fuse: not enough free memory for an exact copy") for m in _logs(result, "s"))


def test_a_failure_in_the_lora_library_names_the_step_and_unloads_the_half_changed_model(engine, tmp_path,
                                                                                        monkeypatch):
    from diffusers import FluxPipeline

    real, seen = FluxPipeline.set_adapters, []

    def failing(self, names, *args, **kwargs):  # the library fails: asked for an adapter it does not hold
        seen.append(self)
        return real(self, ["not-loaded"], *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "set_adapters", failing)
    lora = _lora_file(tmp_path / "l.safetensors", seed=77)  # a LoRA no other test samples (no cache hit)
    body = BASE + f'[nodes.lora]\ntype = "apply_lora"\nmodel = "@base"\nlora = "{lora}"\n\n' + _sample("s", "lora")
    result = run(engine, recipe(tmp_path, body), expect="failed")
    [err] = [e.data for e in result.events if e.event == "node_failed" and e.node == "s"]
    assert err["error"].startswith("setting up this model's LoRAs failed in the LoRA library: ValueError"), err
    assert "unloaded" in err["hint"]
    assert seen and result.outputs["base"]["output"].get() is not seen[-1]  # evicted: the next use loads it afresh


def test_helper_errors_name_the_key_and_say_how_to_fix():
    with pytest.raises(NodeError) as err:
        check_variant("schnell", None, 3.5)
    assert err.value.key == "guidance" and "guidance-distilled" in (err.value.hint or "")
    inputs = [(None, "a.png", None), (None, "b.png", None)]
    with pytest.raises(NodeError) as err:
        make_jobs(["x", "y", "z"], inputs, lambda img: (64, 64))
    assert err.value.key == "prompt" and "one prompt per input image" in (err.value.hint or "")


CP = sample("images", prompt="a red fox", num_inference_steps=2, **SQUARE_256, seed=5)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes")
def test_context_parallel_ranks_make_the_image_of_this_process(engine, tmp_path):
    path = recipe(tmp_path, BASE + "context_parallel = 1\n\n" + CP + '\n[nodes.saved]\ntype = "save"\n'
                  'images = "@images"\noutput_format = "png"\n', name="cp")
    if torch.cuda.is_available():  # the gloo ranks run on the CPU in float32: so must the one-process image (here
        alone = _cli_image(path, tmp_path, "one")  # it would be bfloat16 on the GPU, a different image)
    else:
        alone = _pixels(run(engine, path), "images")
    split_px = _cli_image(path, tmp_path, "two", "--gpus", "2", "--set", "nodes.base.context_parallel=2")
    assert alone.std() > 10 and np.abs(split_px - alone).max() <= 2  # rounding of a differently ordered sum


def _cli_image(path: Path, tmp_path: Path, tag: str, *args: str) -> np.ndarray:
    """The image a `fluxkiln run` process saves, on the CPU (the GPU hidden), with a cache of its own."""
    builtin = Path(os.environ["FLUXKILN_CACHE"]) / "builtin"
    builtin.mkdir(parents=True, exist_ok=True)
    cache = tmp_path / f"cache-{tag}"
    cache.mkdir()
    (cache / "builtin").symlink_to(builtin, target_is_directory=True)
    done = subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", "run", str(path), "--output",
                           str(tmp_path / tag), *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FLUXKILN_CACHE=str(cache), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-3000:]
    [saved] = sorted((tmp_path / tag).glob("saved_*.png"))
    return np.asarray(Image.open(saved).convert("RGB")).astype(np.int16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.compile timing is logged there)")
def test_the_call_that_compiles_logs_its_compile_time(engine, tmp_path):
    body = BASE + _sample("s", "base").replace("go_fast = false", "go_fast = true").replace("256", "320")
    result = run_body(engine, tmp_path, body)
    assert any(m.startswith("torch.compile: ") and " s in this call" in m for m in _logs(result, "s"))
