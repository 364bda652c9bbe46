"""apply_lora on the tiny FLUX model: formats, scales, fusing, errors; no base reloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flux_support import failure, run_body
from fluxkiln.engine.errors import RecipeInvalid
from fluxkiln.engine.runner import Engine

CUDA = torch.cuda.is_available()  # load_model's dtype "auto" is bfloat16 there
RANK = 4
# (diffusers module, out features, in features) of the tiny transformer
LAYERS = [("single_transformer_blocks.0.proj_out", 32, 160), ("transformer_blocks.0.attn.to_q", 32, 32),
          ("transformer_blocks.0.attn.to_k", 32, 32), ("transformer_blocks.0.attn.to_v", 32, 32),
          ("transformer_blocks.0.ff.net.2", 32, 128)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(cache_dir=tmp_path_factory.mktemp("flux-lora-cache"))


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> Path:
    """The same random LoRA as a PEFT/diffusers file and as a hand-written kohya file (fused qkv, alpha)."""
    folder = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(0)
    peft, parts = {}, {}
    for name, out_f, in_f in LAYERS:
        parts[name] = (torch.randn(RANK, in_f, generator=g) * 0.5, torch.randn(out_f, RANK, generator=g) * 0.5)
        peft[f"transformer.{name}.lora_A.weight"], peft[f"transformer.{name}.lora_B.weight"] = parts[name]
    save_file(peft, folder / "peft.safetensors")
    # kohya: alpha 2 with rank 4 scales by 0.5, so the kohya ups are doubled to match
    alpha = torch.tensor(2.0)
    q, k, v = (parts[f"transformer_blocks.0.attn.to_{x}"] for x in "qkv")
    kohya = {
        "lora_unet_single_blocks_0_linear2.lora_down.weight": parts["single_transformer_blocks.0.proj_out"][0],
        "lora_unet_single_blocks_0_linear2.lora_up.weight": parts["single_transformer_blocks.0.proj_out"][1] * 2,
        "lora_unet_single_blocks_0_linear2.alpha": alpha.clone(),
        "lora_unet_double_blocks_0_img_mlp_2.lora_down.weight": parts["transformer_blocks.0.ff.net.2"][0],
        "lora_unet_double_blocks_0_img_mlp_2.lora_up.weight": parts["transformer_blocks.0.ff.net.2"][1] * 2,
        "lora_unet_double_blocks_0_img_mlp_2.alpha": alpha.clone(),
        # fused qkv of rank 12: stacked downs, block-diagonal ups, alpha 6 (scale 0.5)
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.cat([q[0], k[0], v[0]]),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.block_diag(q[1], k[1], v[1]) * 2,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(6.0),
    }
    save_file(kohya, folder / "kohya.safetensors")
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(RANK, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(320, RANK)}
    save_file(sdxl, folder / "sdxl.safetensors")
    big = {"transformer.single_transformer_blocks.0.proj_out.lora_A.weight": torch.ones(RANK, 15360),
           "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": torch.ones(3072, RANK)}
    save_file(big, folder / "full_size.safetensors")
    return folder


def sample_node(nid: str, model: str, seed: int = 5, extra: str = "") -> str:
    return (f'[nodes.{nid}]\ntype = "sample"\nmodel = "@{model}"\nprompt = "a cat"\naspect_ratio = "custom"\n'
            f"width = 256\nheight = 256\nnum_inference_steps = 2\nseed = {seed}\ngo_fast = false\n{extra}\n")


def lora_node(nid: str, lora: str, extra: str = "") -> str:
    return f'[nodes.{nid}]\ntype = "apply_lora"\nmodel = "@base"\nlora = "{lora}"\n{extra}\n'


BASE = '[nodes.base]\ntype = "load_model"\nmodel = "builtin:tiny-flux"\n'


def px(result, node: str) -> np.ndarray:
    return np.asarray(result.outputs[node]["output"][0].image).astype(np.float32)


def assert_same_image(a: np.ndarray, b: np.ndarray, cpu_max: float) -> None:
    """Pixels equal to within ``cpu_max`` levels on a CPU (float32).  On a GPU the model runs in bfloat16: a merged
    LoRA rounds W + BA to bfloat16, go_fast adds fp8 matmuls and the compiled blocks use other kernels, which moves
    a few pixels by a few levels (bfloat16 with the GPU plan, emulated on a CPU: at most 6, 0.23 on average); the
    LoRA itself moves them by about 19 on average."""
    diff = np.abs(a - b)
    if CUDA:
        assert diff.mean() <= 0.75 and diff.max() <= 16, (diff.mean(), diff.max())
    else:
        assert diff.max() <= cpu_max


def test_lora_changes_the_image_scale_zero_does_not_and_formats_agree(engine, loras):
    body = (BASE + lora_node("peft", loras / "peft.safetensors") + lora_node("kohya", loras / "kohya.safetensors")
            + lora_node("zero", loras / "peft.safetensors", "lora_scale = 0.0")
            + lora_node("fused", loras / "peft.safetensors", "fuse = true")
            + sample_node("plain", "base") + sample_node("with_peft", "peft") + sample_node("with_kohya", "kohya")
            + sample_node("with_zero", "zero") + sample_node("with_fused", "fused")
            + sample_node("plain_again", "base", extra="go_fast = true"))
    body = body.replace('go_fast = false\ngo_fast = true', 'go_fast = true')
    result = run_body(engine, loras, body)
    plain = px(result, "plain")
    assert np.abs(px(result, "with_peft") - plain).mean() > 2  # the LoRA changes the image
    assert_same_image(px(result, "with_kohya"), px(result, "with_peft"), 2)  # same LoRA, other format
    assert_same_image(px(result, "with_zero"), plain, 1)  # scale 0 = no LoRA
    assert_same_image(px(result, "with_fused"), px(result, "with_peft"), 2)  # fused = unfused
    # LoRAs removed again; fused QKV is lossless (on a GPU go_fast also means fp8 matmuls: slightly lossy)
    assert_same_image(px(result, "plain_again"), plain, 2)
    item = result.outputs["with_kohya"]["output"][0]
    assert item.meta["loras"] == [{"file": "kohya.safetensors", "scale": 1.0}]
    logs = [e.data["message"] for e in result.events if e.event == "node_log"]
    assert sum("loading FLUX pipeline" in m for m in logs) == 1  # applying/removing LoRAs never reloads the base
    assert any("kohya keys" in m for m in logs)


def test_lora_and_extra_lora_stack_with_scales(engine, loras):
    one = lora_node("one", loras / "peft.safetensors", "lora_scale = 0.5")
    both = lora_node("both", loras / "peft.safetensors",
                     f'lora_scale = 0.25\nextra_lora = "{loras / "kohya.safetensors"}"\nextra_lora_scale = 0.25')
    result = run_body(engine, loras, BASE + one + both + sample_node("a", "one") + sample_node("b", "both"))
    # the two files hold the same LoRA: 0.25 + 0.25 equals 0.5 of one
    assert np.abs(px(result, "a") - px(result, "b")).max() <= 2
    model = result.outputs["both"]["output"]
    assert [a["scale"] for a in model.adapters] == [0.25, 0.25] and model.key == result.outputs["base"]["output"].key


def test_lora_for_another_architecture_or_size_is_a_clear_error(engine, loras):
    result = run_body(engine, loras, BASE + lora_node("x", loras / "sdxl.safetensors"), "sdxl", expect="failed")
    info = failure(result, "x")
    assert "matches no layer of this FLUX model" in info["error"]
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in info["error"] and info["error_type"] == "NodeError"
    result = run_body(engine, loras, BASE + lora_node("x", loras / "full_size.safetensors"), "size", expect="failed")
    assert "other layer sizes" in failure(result, "x")["error"]


def test_missing_lora_file_is_reported(engine, loras):
    with pytest.raises(RecipeInvalid) as err:
        run_body(engine, loras, BASE + lora_node("x", "nowhere/my_lora.safetensors"), "missing")
    assert any(p.key == "lora" and "not found" in p.message for p in err.value.problems)


def test_non_safetensors_lora_is_refused(engine, loras, tmp_path):
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    result = run_body(engine, tmp_path, BASE + lora_node("x", tmp_path / "old.ckpt"), "ckpt", expect="failed")
    assert "only .safetensors" in failure(result, "x")["error"]


def test_hub_lora_not_in_cache_says_how_to_fetch(loras, tmp_path, monkeypatch):
    from fluxkiln.engine import NodeError
    from fluxkiln.plugins.flux.lora import lora_path

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    class Ctx:
        recipe = None

    with pytest.raises(NodeError) as err:
        lora_path("hf:someone/flux-style/style.safetensors", Ctx(), "lora")
    assert "not in the local Hugging Face cache" in str(err.value)
    assert "hf download someone/flux-style style.safetensors" in err.value.hint


def test_loras_over_fp8_stored_weights(tmp_path, loras):
    """What quantize = "fp8" does on a GPU (fluxkiln's fp8-stored layers), applied to the resident tiny pipeline:
    images stay within fp8's rounding, a LoRA still changes them as over the full-precision weights, and
    fuse = true is refused (nothing to merge into)."""
    from flux_support import recipe, run

    from fluxkiln.plugins.flux.fp8linear import Fp8StoredLinear
    from fluxkiln.plugins.flux.load import store_fp8

    engine = Engine(cache_dir=tmp_path / "cache")  # its own: the resident pipeline is changed for good
    body = (BASE + lora_node("peft", loras / "peft.safetensors") + sample_node("plain", "base")
            + sample_node("with_peft", "peft"))
    path = recipe(tmp_path, body, "fp8")
    before = run(engine, path)
    (key,) = engine.models.keys()
    pipe = engine.models.get(key, lambda: None)
    pipe._fluxkiln_fp8 = store_fp8(pipe, pipe.transformer.dtype)
    assert sum(isinstance(m, Fp8StoredLinear) for m in pipe.transformer.modules()) > 0
    after = run(engine, path, force=["plain", "with_peft", "peft"])
    plain, peft = px(after, "plain"), px(after, "with_peft")
    assert 0 < np.abs(plain - px(before, "plain")).mean() <= 3  # fp8's rounding, no more
    assert np.abs(peft - px(before, "with_peft")).mean() <= 3
    assert np.abs(peft - plain).mean() > 2  # the LoRA still acts over fp8 weights
    fused = run(engine, recipe(tmp_path, BASE + lora_node("fused", loras / "peft.safetensors", "fuse = true")
                               + sample_node("img", "fused"), "fp8-fused"))
    assert np.abs(px(fused, "img") - peft).mean() <= 1  # refused to merge: the same unfused LoRA
    assert any("fuse = true ignored" in str(e.data) for e in fused.events if e.event == "node_log")
    # a LoRA first loaded over the fp8 weights (peft makes its layers fp8 too: put back in the compute dtype)
    late = run(engine, recipe(tmp_path, BASE + lora_node("kohya", loras / "kohya.safetensors")
                              + sample_node("img", "kohya"), "fp8-late"))
    assert np.abs(px(late, "img") - peft).mean() <= 1  # the same LoRA in kohya's format
