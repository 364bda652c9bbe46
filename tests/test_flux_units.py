"""FLUX plugin pieces that need no pipeline: output sizes, LoRA key conversion, the sample node's helpers."""

from __future__ import annotations

import pytest
import torch

from fluxkiln.engine import NodeError
from fluxkiln.plugins.flux.lora_keys import peft_to_kohya, to_peft
from fluxkiln.plugins.flux.sample import (DEFAULT_GUIDANCE, MAX_PROMPTS, check_variant, make_jobs, prompt_list,
                                          scaled_adapters)
from fluxkiln.plugins.flux.sizes import ASPECT_RATIOS, output_size, round16, size_like

REPLICATE_1MP = {
    "1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640), "3:2": (1216, 832), "2:3": (832, 1216),
    "4:5": (896, 1088), "5:4": (1088, 896), "3:4": (896, 1152), "4:3": (1152, 896), "9:16": (768, 1344),
    "9:21": (640, 1536),
}


@pytest.mark.parametrize("ratio", sorted(REPLICATE_1MP))
def test_aspect_ratio_sizes_match_replicate_and_quarter_megapixel_halves(ratio):
    w, h = REPLICATE_1MP[ratio]
    assert output_size(ratio, "1") == (w, h)
    assert output_size(ratio, "0.25") == (w // 2, h // 2)
    assert (w // 2) % 16 == 0 and (h // 2) % 16 == 0


def test_every_ratio_is_covered():
    assert set(ASPECT_RATIOS) == set(REPLICATE_1MP)


def test_custom_sizes_round_to_16():
    assert output_size("custom", "1", 1000, 1440) == (1008, 1440)
    assert output_size("custom", "1", 256, 263) == (256, 256)
    assert output_size("custom", "1", 1001, 999) == (1008, 992)
    # 1008 halves to 504, which is not a multiple of 16: rounded again
    assert output_size("custom", "0.25", 1008, 1440) == (512, 720)
    assert round16(8) == 16 and round16(24) == 32 and round16(23.9) == 16


def test_custom_needs_width_and_height_and_others_refuse_them():
    with pytest.raises(ValueError, match="needs both width and height"):
        output_size("custom", "1", 512, None)
    with pytest.raises(ValueError, match='only apply with aspect_ratio = "custom"'):
        output_size("16:9", "1", 512, 512)


def test_size_like_keeps_the_input_aspect():
    w, h = size_like((4000, 3000), "1")
    assert w % 16 == 0 and h % 16 == 0
    assert abs(w / h - 4 / 3) < 0.03 and abs(w * h - 1024 * 1024) < 0.05 * 1024 * 1024
    assert size_like((300, 300), "0.25") == (512, 512)


# ------------------------------------------------------------------ LoRA keys
def _peft(modules: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_f, in_f) in modules.items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g)
    return sd


def _delta(sd: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    return sd[f"transformer.{module}.lora_B.weight"] @ sd[f"transformer.{module}.lora_A.weight"]


def test_kohya_fused_qkv_splits_into_q_k_v_with_alpha_baked_in():
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 32, generator=g), torch.randn(96, 4, generator=g)
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}
    conv = to_peft(kohya)
    assert conv.source_format == "kohya" and not conv.unknown
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        want = up[32 * i:32 * (i + 1)] @ down * (2.0 / 4)
        assert torch.allclose(_delta(conv.state_dict, f"transformer_blocks.0.attn.{part}"), want, atol=1e-5)


def test_single_block_linear1_splits_into_qkv_and_mlp():
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(2, 32, generator=g), torch.randn(224, 2, generator=g)
    conv = to_peft({"diffusion_model.single_blocks.1.linear1.lora_A.weight": down,
                    "diffusion_model.single_blocks.1.linear1.lora_B.weight": up})
    assert conv.source_format == "bfl"
    assert torch.allclose(_delta(conv.state_dict, "single_transformer_blocks.1.proj_mlp"), up[96:] @ down)
    assert torch.allclose(_delta(conv.state_dict, "single_transformer_blocks.1.attn.to_k"), up[32:64] @ down)


def test_peft_kohya_round_trip_keeps_every_delta():
    modules = {"transformer_blocks.0.attn.to_q": (32, 32), "transformer_blocks.0.attn.to_v": (32, 32),
               "transformer_blocks.0.attn.add_k_proj": (32, 32), "transformer_blocks.0.ff_context.net.2": (32, 128),
               "single_transformer_blocks.0.proj_mlp": (128, 32), "single_transformer_blocks.1.proj_out": (32, 160),
               "norm_out.linear": (64, 32), "x_embedder": (32, 16)}
    sd = _peft(modules)
    kohya = peft_to_kohya(sd, alpha=4)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 8  # q and v: rank 4 each
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 8.0
    assert all(k.startswith("lora_unet_") for k in kohya)
    back = to_peft(kohya)
    assert not back.unknown
    for m in modules:
        assert torch.allclose(_delta(sd, m), _delta(back.state_dict, m), atol=1e-4), m
    # parts nobody trained are not invented
    assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" not in back.state_dict


def test_final_layer_modulation_halves_are_swapped():
    sd = _peft({"norm_out.linear": (64, 32)})
    kohya = peft_to_kohya(sd, alpha=4)
    up = kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(up[:32], sd["transformer.norm_out.linear.lora_B.weight"][32:])


def test_diffusers_variants_and_alpha_keys_are_read():
    sd = _peft({"single_transformer_blocks.0.proj_out": (32, 160)})
    raw = {k.replace("transformer.", "", 1): v for k, v in sd.items()}  # raw PEFT keys without a prefix
    raw["single_transformer_blocks.0.proj_out.alpha"] = torch.tensor(8.0)
    conv = to_peft(raw)
    assert torch.allclose(_delta(conv.state_dict, "single_transformer_blocks.0.proj_out"),
                          _delta(sd, "single_transformer_blocks.0.proj_out") * 2, atol=1e-5)
    kohya_diffusers = {"lora_transformer_single_transformer_blocks_0_proj_out.lora_down.weight": torch.ones(2, 160),
                       "lora_transformer_single_transformer_blocks_0_proj_out.lora_up.weight": torch.ones(32, 2)}
    assert to_peft(kohya_diffusers).modules() == ["transformer.single_transformer_blocks.0.proj_out"]


def test_clip_text_encoder_keys_both_ways():
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 32),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 2)}
    conv = to_peft(te)
    assert conv.modules() == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    again = peft_to_kohya(conv.state_dict, alpha=2)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in again


def test_keys_of_other_architectures_and_kinds_are_reported():
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(4, 2)}
    conv = to_peft(sdxl)
    assert not conv.state_dict and len(conv.unknown) == 2
    lokr = {"lora_unet_single_blocks_0_linear2.lokr_w1": torch.ones(2, 2)}
    assert to_peft(lokr).unsupported == ["lora_unet_single_blocks_0_linear2.lokr_w1"]
    with pytest.raises(ValueError, match="no kohya name"):
        peft_to_kohya(_peft({"some.other.layer": (4, 4)}), alpha=4)


def test_variant_defaults_and_limits():
    assert check_variant("dev", None, None) == (28, DEFAULT_GUIDANCE)
    assert check_variant("dev", 50, 5.5) == (50, 5.5)
    assert check_variant("schnell", None, None) == (4, None)
    assert check_variant("schnell", 4, None) == (4, None)
    with pytest.raises(NodeError) as err:
        check_variant("dev", 51, None)
    assert err.value.key == "num_inference_steps" and "at most 50 steps, got num_inference_steps = 51" in str(err.value)
    assert "use 1 to 50 (default 28)" in (err.value.hint or "")
    with pytest.raises(NodeError) as err:
        check_variant("schnell", 5, None)
    assert "at most 4 steps" in str(err.value) and "use 1 to 4 (default 4)" in (err.value.hint or "")
    with pytest.raises(NodeError) as err:
        check_variant("schnell", 4, 3.0)
    assert err.value.key == "guidance"


def test_prompt_lists():
    assert prompt_list("a cat") == ["a cat"]
    assert prompt_list(["a", 2]) == ["a", "2"]
    assert len(prompt_list(["p"] * MAX_PROMPTS)) == MAX_PROMPTS
    for bad, words in (([], "empty list"), (["p"] * (MAX_PROMPTS + 1), f"{MAX_PROMPTS + 1} prompts, more than")):
        with pytest.raises(NodeError) as err:
            prompt_list(bad)
        assert err.value.key == "prompt" and words in str(err.value) and err.value.hint


def size_of(img):
    return (64, 32) if img is None else (img * 16, img * 16)


def test_text_to_image_makes_one_job_per_prompt():
    jobs = make_jobs(["a", "b"], None, size_of)
    assert [(j.prompt, j.prompt_index, j.size, j.init, j.init_label) for j in jobs] == [("a", 0, (64, 32), None, None),
                                                                             ("b", 1, (64, 32), None, None)]
    assert make_jobs(["a"], [], size_of)[0].size == (64, 32)


def test_image_to_image_jobs_pair_prompts_with_images():
    one = make_jobs(["a", "b"], [(2, "x.png", "own")], size_of)
    assert [(j.prompt, j.prompt_index, j.size, j.init, j.init_label) for j in one] == [("a", 0, (32, 32), 2, "x.png"),
                                                                            ("b", 1, (32, 32), 2, "x.png")]
    inputs = [(1, "p.png", "own p"), (3, "q.png", None)]
    paired = make_jobs(["a", "b"], inputs, size_of)
    assert [(j.prompt, j.prompt_index, j.size, j.init, j.init_label) for j in paired] == [("a", 0, (16, 16), 1, "p.png"),
                                                                               ("b", 1, (48, 48), 3, "q.png")]
    assert [j.prompt for j in make_jobs([""], inputs, size_of)] == ["own p", ""], "empty prompt: each keeps its own"
    assert [j.prompt for j in make_jobs(["one"], inputs, size_of)] == ["one", "one"]
    with pytest.raises(NodeError) as err:
        make_jobs(["a", "b", "c"], inputs, size_of)
    assert err.value.key == "prompt" and "2 input images and 3 prompts" in str(err.value)


def test_lora_scale_multiplies_every_adapter_scale():
    adapters = [{"name": "a", "scale": 0.5}, {"name": "b", "scale": 2}]
    assert scaled_adapters(adapters, None) == adapters and scaled_adapters(adapters, None) is not adapters
    assert scaled_adapters(adapters, 3.0) == [{"name": "a", "scale": 1.5}, {"name": "b", "scale": 6.0}]
    assert adapters[0]["scale"] == 0.5, "the model's own list is not changed"
