"""The GPU-only paths, on a CUDA GPU (skipped elsewhere): model and sequential offload, fp8-stored weights
(``quantize = "fp8"``), the real fp8 matmul of ``go_fast``, Inductor compilation of the transformer blocks, the
compiled VAE decoder, and the 8-bit optimizer that ``optimizer = "auto"`` picks when bitsandbytes is installed.

Each path is compared with the eager bf16 one on the tiny model: close (the fast paths are numerically near), and
the path really ran (the state the pipeline reports, the optimizer the log names)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_support import run_body
from test_train_support import losses, run, solid_dataset, write_recipe

from fluxkiln.engine.runner import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SAMPLE = ('[nodes.img]\ntype = "sample"\nmodel = "@base"\nprompt = "a red fox"\naspect_ratio = "custom"\n'
          'width = 256\nheight = 256\nnum_inference_steps = 4\nseed = 3\n')


def _base(extra: str = "") -> str:
    return f'[nodes.base]\ntype = "load_model"\nmodel = "builtin:tiny-flux"\ndtype = "bfloat16"\n{extra}\n'


def _pixels(result) -> np.ndarray:
    return np.asarray(result.outputs["img"]["output"][0].image, dtype=np.float64)


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> float:
    diff = float(np.abs(a - b).mean())
    assert diff <= tol, f"mean pixel difference {diff:.2f} > {tol}"
    return diff


@pytest.fixture
def engine(tmp_path):
    return Engine(cache_dir=tmp_path / "cache")


def _eager(engine, tmp_path) -> np.ndarray:
    return _pixels(run_body(engine, tmp_path, _base() + SAMPLE + "go_fast = false\n", "eager"))


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_keeps_the_image(engine, tmp_path, offload):
    ref = _eager(engine, tmp_path)
    result = run_body(engine, tmp_path, _base(f'offload = "{offload}"') + SAMPLE + "go_fast = false\n", offload)
    assert result.outputs["base"]["output"].info.get("offload") == offload
    _close(_pixels(result), ref, 2.0)


def test_fp8_stored_weights_sample_close_to_bf16(engine, tmp_path):
    from fluxkiln.plugins.flux.fast import fp8_supported

    if not fp8_supported()[0]:
        pytest.skip(fp8_supported()[1])
    ref = _eager(engine, tmp_path)
    result = run_body(engine, tmp_path, _base('quantize = "fp8"') + SAMPLE + "go_fast = false\n", "fp8")
    assert result.outputs["base"]["output"].info.get("quantize") == "fp8"
    _close(_pixels(result), ref, 12.0)


def test_real_fp8_matmul_is_close_and_is_fp8():
    from fluxkiln.plugins.flux.fast import fp8_linear_class, fp8_supported

    if not fp8_supported()[0]:
        pytest.skip(fp8_supported()[1])
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    f8 = fp8_linear_class()(lin)
    assert f8.weight_fp8.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        ref, got = lin(x).float(), f8(x).float()
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.06, rel  # fp8 really changed the arithmetic, and only a little


def test_go_fast_compiles_the_blocks_and_the_vae_and_stays_close(engine, tmp_path):
    from fluxkiln.plugins.flux.pipestate import state_of

    ref = _eager(engine, tmp_path)
    result = run_body(engine, tmp_path, _base() + SAMPLE + "go_fast = true\n", "fast")
    pipe = result.outputs["base"]["output"].get()
    st = state_of(pipe)
    assert st.compiled and st.vae_compiled
    _close(_pixels(result), ref, 12.0)


def test_inductor_blocks_match_eager():
    from fluxkiln.plugins.flux import fast
    from fluxkiln.plugins.flux.tiny import build_tiny_flux

    pipe = build_tiny_flux("dev").to("cuda", torch.bfloat16)
    t = pipe.transformer
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 64, t.config.in_channels, generator=gen),
                  encoder_hidden_states=torch.randn(1, 8, t.config.joint_attention_dim, generator=gen),
                  pooled_projections=torch.randn(1, t.config.pooled_projection_dim, generator=gen),
                  timestep=torch.full((1,), 0.5), guidance=torch.full((1,), 3.0),
                  img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3))
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() and k != "guidance" else v.dtype)
              for k, v in inputs.items()}
    with torch.no_grad():
        eager = t(**inputs, return_dict=False)[0].float()
        assert fast.compile_blocks(t) > 0 and fast.is_compiled(t)
        compiled = t(**inputs, return_dict=False)[0].float()
    assert float((compiled - eager).norm() / eager.norm()) < 0.02


def test_compiled_vae_decoder_matches_eager(monkeypatch):
    from fluxkiln.plugins.flux import fast

    monkeypatch.setenv("FLUXKILN_COMPILE_VAE", "1")  # compiled from the first decode (default: where it pays)
    from fluxkiln.plugins.flux.tiny import build_tiny_flux

    # float32: the compiled decoder must compute what the eager one does (in bf16 the tiny VAE's designed
    # large constants turn rounding-order differences into ~8 %; in float32 Inductor's TF32 convolutions leave
    # 0.24 % on an H100 — a broken decoder is off by ~100 %)
    vae = build_tiny_flux("dev").vae.to("cuda", torch.float32)
    latents = torch.randn(1, vae.config.latent_channels, 32, 32, generator=torch.Generator().manual_seed(2))
    latents = latents.to("cuda", torch.float32)
    with torch.no_grad():
        eager = vae.decode(latents).sample.float()
        fast.set_vae_compiled(vae, True)
        assert getattr(vae.decoder, "_compiled_call_impl", None) is not None
        before = fast.compile_seconds()["compile"]
        compiled = vae.decode(latents).sample.float()
        assert fast.compile_seconds()["compile"] > before  # the decoder really was compiled
    assert float((compiled - eager).norm() / eager.norm()) < 0.01


def test_optimizer_auto_is_8bit_with_bitsandbytes_and_learns(tmp_path):
    pytest.importorskip("bitsandbytes")
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=30, optimizer="auto", learning_rate=5e-3)
    result = run(recipe, tmp_path / "cache", tmp_path / "out")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    logs = " ".join(e.data["message"] for e in result.events if e.event == "node_log" and e.node == "lora")
    assert "adamw8bit" in logs
    got = losses(result)
    assert np.mean(got[-10:]) < np.mean(got[:10])


@pytest.mark.timeout(480)  # three fresh processes, the first compiling on a cold cache
def test_a_run_saves_precompiled_blocks_warmup_adds_the_decoder_and_a_new_process_loads_them(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from fluxkiln.plugins.flux import precompiled

    (tmp_path / "f.toml").write_text('[recipe]\nname = "pre"\n' + _base() + SAMPLE)
    env = {**os.environ, "FLUXKILN_CACHE": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    saved = tmp_path / "cache" / "precompiled"

    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "fluxkiln", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    def messages(proc: subprocess.CompletedProcess) -> list[str]:
        return [json.loads(line).get("message", "") for line in proc.stdout.splitlines() if line.startswith("{")]

    first = messages(cli("run", "f.toml", "--json"))
    why = precompiled.unavailable()
    if why is not None:  # this torch cannot precompile: nothing is saved, runs compile as before
        assert not list(saved.glob("*/*.bin"))
        pytest.skip(why)
    # a plain run saves what it compiled: one double-stream and one single-stream variant (the first single block
    # is called with the others' input layout); the VAE decoder of a short run decodes eagerly
    names = sorted(p.name.split("-")[0] for p in saved.glob("*/*.bin"))
    assert names == ["FluxSingleTransformerBlock", "FluxTransformerBlock"], (names, first)
    assert any("2 variant(s) saved precompiled for later processes" in m for m in first), first

    warm = cli("warmup", "f.toml")
    assert "1 sample node(s) compiled" in warm.stdout, warm.stdout
    assert "1 transformer block and VAE decoder variant(s) newly saved precompiled" in warm.stdout, warm.stdout
    assert any(p.name.startswith("Decoder-") for p in saved.glob("*/*.bin"))

    later = messages(cli("run", "f.toml", "--json", "--force"))  # not from the run cache
    loaded = "3 precompiled variant(s) (transformer blocks, VAE decoder) saved by earlier runs loaded"
    assert any(loaded in m for m in later), later
    assert not any(m.startswith("torch.compile:") for m in later), later  # nothing traced or compiled
