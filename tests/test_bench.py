"""``fluxkiln bench --tiny`` (the benchmark's real code paths on the tiny model, on CPU) and the fast-path
helpers it measures: block compilation, fp8 linears with exact restore, and the speed plan."""

from __future__ import annotations

import json

import pytest
import torch

from fluxkiln.engine import cli
from fluxkiln.plugins.flux import fast
from fluxkiln.plugins.flux.pipestate import plan, prepare, state_of
from fluxkiln.plugins.flux.tiny import build_tiny_flux

CUDA = torch.cuda.is_available()
SAMPLE_ROWS = {"dev-stock", "dev-lossless", "dev-go_fast", "schnell-stock", "schnell-go_fast"}


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.timeout(300)  # on a GPU every row compiles (104 s alone on an H200, past 120 s beside 15 xdist workers)
def test_bench_tiny_runs_the_engine_paths_and_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--tiny", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["mode"] == "tiny"
    assert set(res["sample"]) == SAMPLE_ROWS
    for name in SAMPLE_ROWS - {"dev-stock", "schnell-stock"}:
        row = res["sample"][name]
        assert row["s_per_image"] > 0 and row["ratio_to_stock"] > 0
        assert row["engine"]["bare_pipeline_s"] > 0 and "overhead_run_pct" in row["engine"]
        # on CPU no fast path changes the maths: the node's output is the eager one; on a GPU the guard is small
        limit = 0.05 if CUDA else 1e-5
        assert row["transformer_rel_diff"] < limit and row["block_rel_diff"] < limit
        assert row["engine"]["cache_store_s"] > 0
    assert res["sample"]["dev-go_fast"]["fast_paths"]["fused_qkv"] is True
    # the lossless path: on a GPU compiled blocks and VAE decoder, fused QKV and the modulation table; on CPU none
    assert res["sample"]["dev-lossless"]["fast_paths"] == {"compiled_blocks": CUDA, "fused_qkv": CUDA,
                                                           "fp8": False, "fp8_attention": False,
                                                           "compiled_vae": CUDA, "modulation_table": CUDA}
    assert set(res["train"]) == {"no_ckpt", "no_ckpt-stock", "ckpt", "ckpt-stock", "ckpt_every_2nd", "fp8_ckpt_24gb"}
    if not CUDA:
        assert res["train"].pop("fp8_ckpt_24gb") == {"skipped": "needs a CUDA GPU (fp8 storage, model offload)"}
    assert all(r["s_per_step"] > 0 for r in res["train"].values())
    for name in ("dev-stock", "dev-go_fast", "schnell-go_fast"):  # where each image's time goes
        stages = res["sample"][name]["stages_s"]
        assert stages["transformer"] > 0 and stages["text_encoders"] > 0 and stages["vae_decode"] > 0
        assert sum(v for k, v in stages.items() if k != "total") == pytest.approx(stages["total"], abs=2e-3)
    assert [t["met"] for t in res["targets"]] == [None] * len(res["targets"])  # not judged on the tiny model
    printed = capsys.readouterr().out
    table = printed[printed.index("fluxkiln bench"):]
    assert "dev-go_fast" in table and "schnell-stock" in table and "engine overhead" in table
    assert len(res["residency_keys"]) == 2 and all(k.startswith("flux|folder|") for k in res["residency_keys"])


def test_bench_rejects_unknown_configs(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--tiny", "--configs", "dev-warp"])
    assert exc.value.code == 2
    assert "unknown --configs dev-warp" in capsys.readouterr().err


def test_bench_rejects_unknown_train_configs(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--tiny", "--train-configs", "ckpt,fp16_warp"])
    assert exc.value.code == 2
    assert "unknown --train-configs fp16_warp; choose from no_ckpt, ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--tiny", "--train-configs", "fp8_ckpt_24gb_layerwise,fp8_ckpt_24gb"])
    assert exc.value.code == 2
    assert "need a run each" in capsys.readouterr().err


def test_bench_only_sample_one_config(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--tiny", "--only", "sample", "--configs", "schnell-go_fast", "--no-stock",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["sample"]) == {"schnell-go_fast"} and res["train"] == {}
    assert "ratio_to_stock" not in res["sample"]["schnell-go_fast"]
    phases = res["sample"]["schnell-go_fast"]["engine"]["phases_ms"]
    assert phases["pipeline call"] > 0 and phases["cache store"] > 0


def _transformer_inputs(pipe):
    gen = torch.Generator().manual_seed(0)
    cfg = pipe.transformer.config
    return dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=gen),
                encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=gen),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.0]),
                img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32), txt_ids=torch.zeros(8, 3))


def test_fp8_linears_approximate_and_restore_exactly():
    pipe = build_tiny_flux("dev")
    t = pipe.transformer
    inputs = _transformer_inputs(pipe)
    with torch.no_grad():
        ref = t(**inputs, return_dict=False)[0]
        n = fast.fp8_apply(t)
        assert n > 0 and fast.has_fp8(t) and fast.fp8_apply(t) == 0  # idempotent
        approx = t(**inputs, return_dict=False)[0]
        assert fast.fp8_restore(t) == n and not fast.has_fp8(t)
        back = t(**inputs, return_dict=False)[0]
    err = float((approx - ref).norm() / ref.norm())
    assert 0 < err < 0.15
    assert torch.equal(back, ref)



def test_an_fp8_block_pickles_by_reference_as_precompiled_blocks_need():
    """``fluxkiln warmup`` saves compiled blocks with the modules they call, pickled by reference: the fp8 layer
    must be an importable class (one made inside a function cannot be saved, so go_fast blocks never were)."""
    import pickle

    pipe = build_tiny_flux("dev")
    assert fast.fp8_apply(pipe.transformer) > 0
    cls = fast.fp8_linear_class()
    assert any(isinstance(m, cls) for m in pipe.transformer.transformer_blocks[0].modules())
    assert "<locals>" not in cls.__qualname__ and cls.__module__ == "fluxkiln.plugins.flux.fp8linear"
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_fp8_skips_projections_replaced_by_fused_qkv():
    t = build_tiny_flux("dev").transformer
    unfused = len(fast._fp8_candidates(t))
    t.fuse_qkv_projections()
    names = [attr for _p, attr, _m in fast._fp8_candidates(t)]
    assert "to_qkv" in names and "to_q" not in names and len(names) < unfused


def test_fp8_swaps_the_same_layers_when_lora_adapters_are_loaded():
    """A plain image must not depend on whether LoRAs were ever loaded on the resident pipeline: with adapters
    loaded (switched off, or merged), fp8 swaps the base linear inside each LoRA wrapper."""
    pipe = build_tiny_flux("dev")
    t = pipe.transformer
    inputs = _transformer_inputs(pipe)
    with torch.no_grad():
        fast.fp8_apply(t)
        plain = t(**inputs, return_dict=False)[0]
        fast.fp8_restore(t)
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                 "single_transformer_blocks.0.proj_out"):
        layer = t.get_submodule(name)
        lora[f"transformer.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=gen)
        lora[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=gen)
    plain_count = len(fast._fp8_candidates(t))
    pipe.load_lora_weights(lora, adapter_name="style")
    pipe.disable_lora()
    assert len(fast._fp8_candidates(t)) == plain_count
    with torch.no_grad():
        n = fast.fp8_apply(t)
        assert n == plain_count and isinstance(t.get_submodule("transformer_blocks.0.ff.net.2.base_layer"),
                                                 fast.fp8_linear_class())
        assert torch.equal(t(**inputs, return_dict=False)[0], plain)
        assert fast.fp8_restore(t) == n and isinstance(
            t.get_submodule("transformer_blocks.0.ff.net.2.base_layer"), torch.nn.Linear)
    t.fuse_qkv_projections()  # to_q's base layer is then replaced by to_qkv, like a plain to_q
    names = [attr for _p, attr, _m in fast._fp8_candidates(t)]
    assert "to_qkv" in names and names.count("base_layer") == 2


def test_compile_blocks_in_place_and_back():
    pipe = build_tiny_flux("dev")
    t = pipe.transformer
    inputs = _transformer_inputs(pipe)
    with torch.no_grad():
        ref = t(**inputs, return_dict=False)[0]
        assert fast.compile_blocks(t, backend="eager") == 3 and fast.is_compiled(t)
        assert fast.compile_blocks(t, backend="eager") == 0
        got = t(**inputs, return_dict=False)[0]
        assert fast.uncompile_blocks(t) == 3 and not fast.is_compiled(t)
    assert torch.allclose(got, ref, atol=1e-6)


def test_speed_plan_gpu_defaults_and_fp8_reasons(monkeypatch):
    pipe = build_tiny_flux("dev")
    pipe._fluxkiln_offload = "none"
    monkeypatch.setattr(fast, "fp8_supported", lambda: (True, ""))
    p = plan(pipe, {}, False, True, "cuda", True)
    assert (p.qkv, p.vae_compile, p.compile, p.fp8) == (True, True, True, True)
    lossless = plan(pipe, {}, False, False, "cuda", True)
    assert (lossless.compile, lossless.qkv, lossless.fp8, lossless.fp8_skipped) == (True, True, False, "")
    lora = plan(pipe, {"style": 1.0}, False, True, "cuda", True)
    assert not lora.fp8 and not lora.qkv and "unfused" in lora.fp8_skipped
    monkeypatch.setenv("FLUXKILN_COMPILE_VAE", "0")
    only_blocks = plan(pipe, {}, False, True, "cuda", True)
    assert only_blocks.compile and not only_blocks.vae_compile
    monkeypatch.setenv("FLUXKILN_COMPILE_VAE", "1")
    monkeypatch.setenv("FLUXKILN_COMPILE", "0")
    off = plan(pipe, {}, False, True, "cuda", True)
    assert not off.compile and not off.vae_compile
    training = plan(pipe, {}, False, False, "cuda", False)
    assert (training.qkv, training.compile, training.fp8, training.vae_compile) == (False, False, False, False)
    monkeypatch.setattr(fast, "fp8_supported", lambda: (False, "GPU compute capability 8.0 < 8.9"))
    assert plan(pipe, {}, False, True, "cuda", True).fp8_skipped == "GPU compute capability 8.0 < 8.9"


def test_prepare_on_cpu_keeps_the_old_behaviour_and_training_resets():
    pipe = build_tiny_flux("dev")
    logs: list[str] = []
    got = prepare(pipe, [], True, "cpu", lambda _a: {}, fast=True, log=logs.append)
    st = state_of(pipe)
    assert got.qkv and st.qkv_fused and not st.compiled and not st.fp8 and not st.vae_compiled and logs == []
    prepare(pipe, [], False, "cpu", lambda _a: {})
    assert not st.qkv_fused


def test_kernel_kinds_and_idle_time_from_a_trace():
    from fluxkiln.plugins.bench.profile import busy_time, kind_of, summarize_trace

    assert kind_of("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kind_of("sm90_xmma_gemm_e4m3e4m3_bf16_f32_tn_n_tilesize128x128x128") == "gemm_fp8"
    assert kind_of("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert kind_of("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT") == "gemm_fp8"
    assert kind_of("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_4") == "triton_fused"
    assert kind_of("triton_per_fused_add_mul_native_layer_norm_0") == "triton_fused"
    assert kind_of("void at::native::elementwise_kernel<128, 2>") == "other"
    assert busy_time([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)
    trace = {"traceEvents": [
        {"cat": "kernel", "name": "nvjet_gemm", "ts": 0, "dur": 4000},
        {"cat": "kernel", "name": "flash_fwd", "ts": 4000, "dur": 2000},
        {"cat": "kernel", "name": "triton_poi_fused_mul", "ts": 8000, "dur": 1000},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9000}]}
    got = summarize_trace(trace, wall_ms=10.0)
    assert got["ms_by_kind"] == {"gemm": 4.0, "attention": 2.0, "triton_fused": 1.0}
    assert got["busy_ms"] == 7.0 and got["idle_pct"] == 30.0 and got["kernels"] == 3


def test_bench_train_profile_adds_each_rows_step_profile(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--tiny", "--only", "train", "--train-configs", "ckpt", "--no-stock", "--train-profile",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["errors"] == []
    prof = res["train"]["ckpt"]["profile"]
    assert prof["steps"] == 3 and prof["wall_ms_per_step"] > 0
    if not CUDA:  # no kernels on a CPU
        assert prof["gpu_busy_ms_per_step"] == 0 and prof["idle_pct"] == 100.0
    else:
        assert prof["gpu_busy_ms_per_step"] > 0 and prof["kernels_per_step"] > 0


def test_training_steps_are_marked_for_the_profiler_and_summarized(tmp_path):
    """train_lora marks each step; ``--train-profile`` summarizes the GPU's kernels over the last marked steps."""
    from test_train_support import run, solid_dataset, write_recipe
    from torch.profiler import ProfilerActivity, profile

    from fluxkiln.plugins.bench.training import step_profile
    from fluxkiln.plugins.train.loop import STEP_MARK

    recipe = write_recipe(tmp_path / "r.toml", solid_dataset(tmp_path / "data"), steps=4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        assert run(recipe, tmp_path / "cache", tmp_path / "out").ok
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    trace = json.loads((tmp_path / "trace.json").read_text())
    marks = [e for e in trace["traceEvents"] if e.get("name") == STEP_MARK]
    assert len(marks) == 4
    got = step_profile(trace)  # a CPU run has no kernels: the GPU "idles" throughout
    assert got["steps"] == 3 and got["wall_ms_per_step"] > 0
    assert got["gpu_busy_ms_per_step"] == 0 and got["idle_pct"] == 100.0

    def mark(ts):
        return {"name": STEP_MARK, "ph": "X", "ts": ts, "dur": 10_000}

    synthetic = {"traceEvents": [mark(0), mark(20_000), mark(30_000), mark(40_000),
                                 {"cat": "kernel", "name": "nvjet_gemm", "ts": 5_000, "dur": 9_000},  # step 1
                                 {"cat": "kernel", "name": "nvjet_gemm", "ts": 20_000, "dur": 6_000},
                                 {"cat": "kernel", "name": "flash_fwd", "ts": 31_000, "dur": 3_000},
                                 {"cat": "kernel", "name": "nvjet_gemm", "ts": 41_000, "dur": 6_000}]}
    got = step_profile(synthetic)  # the last three steps: 30 ms of wall time, 15 ms of kernels
    assert got["wall_ms_per_step"] == 10.0 and got["gpu_busy_ms_per_step"] == 5.0 and got["idle_pct"] == 50.0
    assert got["ms_by_kind_per_step"] == {"gemm": 4.0, "attention": 1.0} and got["kernels_per_step"] == 1
    with pytest.raises(RuntimeError, match=STEP_MARK):
        step_profile({"traceEvents": []})


def test_vae_decoder_compiles_in_place_and_back(one_thread):
    vae = build_tiny_flux("dev").vae
    z = torch.randn(1, vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z).sample
        fast.set_vae_compiled(vae, True)
        assert vae.decoder._compiled_call_impl is not None
        fast.set_vae_compiled(vae, False)
        assert vae.decoder._compiled_call_impl is None
        assert torch.equal(vae.decode(z).sample, ref)


def test_bench_generation_rows_on_the_tiny_model(tmp_path):
    """--generation: Full HD (a quarter of it on the tiny model) beside stock, and the hybrid beside dev."""
    out = tmp_path / "gen.json"
    assert cli.main(["bench", "--tiny", "--only", "sample", "--configs", "dev-lossless", "--no-stock",
                     "--generation", "fullhd-stock,fullhd-lossless,hybrid", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    gen = res["generation"]
    assert set(gen) == {"fullhd-stock", "fullhd-lossless", "hybrid"} and res["errors"] == []
    assert gen["fullhd-lossless"]["size"] == [480, 272] and gen["fullhd-lossless"]["ratio_to_stock"] > 0
    # img2img keeps the draft's aspect at the megapixel setting: 0.25 MP (512²) on the tiny model, 1 MP on FLUX
    assert gen["hybrid"]["size"] == [512, 512] and gen["hybrid"]["ratio_to_dev_28_steps"] > 0
    assert all(r["s_per_image"] > 0 for r in gen.values())


def test_bench_rejects_unknown_generation_configs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--tiny", "--generation", "fullhd-warp"])
    assert "unknown --generation fullhd-warp" in capsys.readouterr().err


def test_bench_step_cache_and_compile_mode_rows(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--tiny", "--only", "sample", "--configs",
                     "dev-go_fast-cache,dev-go_fast-graphs,dev-go_fast-nograph", "--cache-threshold", "1.0", "--no-stock", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    cached = res["sample"]["dev-go_fast-cache"]
    assert cached["cache_threshold"] == 1.0 and cached["cache_skipped_steps"] >= 1
    assert cached["cache_computed_steps"] + cached["cache_skipped_steps"] == 4
    assert "cache_threshold" not in res["sample"]["dev-go_fast-graphs"]
    import os

    assert "FLUXKILN_COMPILE_MODE" not in os.environ  # put back after the -graphs row
    assert res["sample"]["dev-go_fast-nograph"]["s_per_image"] > 0
    assert "FLUXKILN_CUDA_GRAPHS" not in os.environ  # and after the -nograph row


def test_compile_mode_from_the_environment(monkeypatch):
    monkeypatch.delenv("FLUXKILN_COMPILE_MODE", raising=False)
    assert fast.compile_mode() is None
    monkeypatch.setenv("FLUXKILN_COMPILE_MODE", "reduce-overhead")
    assert fast.compile_mode() == "reduce-overhead"
    block = torch.nn.Linear(2, 2)
    seen = {}

    def compile_(fn, **kw):
        seen.update(kw)
        return fn

    monkeypatch.setattr(torch, "compile", compile_)

    class T(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([block])

    assert fast.compile_blocks(T(), backend="eager") == 1 and "mode" not in seen  # only Inductor takes a mode
    assert block._compiled_call_impl == block._call_impl  # what torch.compile returned is what the block calls
    block._compiled_call_impl = None
    monkeypatch.setattr(fast, "setup_compile_cache", lambda: "")
    t = T()
    assert fast.compile_blocks(t, backend="inductor") == 1 and seen["mode"] == "reduce-overhead"
    # CUDA graphs: every transformer call (a denoising step) starts a new generation of graphs
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    block._compiled_call_impl = None  # the blocks run eagerly, with the step hook in place
    t.forward = lambda x: t.transformer_blocks[0](x)
    t(torch.zeros(1, 2))
    t(torch.zeros(1, 2))
    assert len(steps) == 2
    fast.uncompile_blocks(t)
    t(torch.zeros(1, 2))
    assert len(steps) == 2 and not t._forward_pre_hooks  # eager again: no marks


def test_engine_phases_are_timed_and_put_back(tmp_path):
    from fluxkiln.engine.runner import Engine
    from fluxkiln.plugins.bench.overhead import engine_phases, per_run_ms

    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "r"\n[nodes.a]\ntype = "test_images"\n')
    from fluxkiln.engine.testplugins import load_registry as _load_registry

    engine = Engine(_load_registry([]), cache_dir=tmp_path / "cache")
    before = Engine.plan
    with engine_phases() as spent:
        import time

        t0 = time.perf_counter()
        for _ in range(2):
            assert engine.run(recipe, force_all=True, output=tmp_path / "runs").ok
        wall = time.perf_counter() - t0
    assert Engine.plan is before  # unwrapped again
    assert {"validate", "plan", "run-folder lock", "cache store", "report", "events"} <= set(spent)
    ms = per_run_ms(spent, 2, wall)
    assert ms["cache store"] > 0 and "pipeline call" not in ms
    accounted = sum(v for k, v in ms.items() if k != "events")
    assert abs(accounted - 1000 * wall / 2) < 0.5  # the phases and the rest add up to the wall time
