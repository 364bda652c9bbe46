"""train_lora on a CUDA GPU (skipped elsewhere): bf16, the SDPA backends that survive the backward pass,
gradient checkpointing, and full-size FLUX.1-dev shapes with random weights (nothing is downloaded)."""

from __future__ import annotations

import statistics

import pytest
import torch
from test_train_support import losses, run, solid_dataset, write_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FLUX_DEV = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
                axes_dims_rope=(16, 56, 56))


def test_tiny_model_trains_in_bf16_on_the_gpu(tmp_path):
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=40, learning_rate=5e-3, lora_rank=16,
                          gradient_checkpointing=True)
    result = run(recipe, tmp_path / "cache", tmp_path / "out")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    got = losses(result)
    assert statistics.mean(got[-10:]) < statistics.mean(got[:10])
    assert result.outputs["base"]["output"].info["dtype"] == "bfloat16"


def _full_size_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxkiln.plugins.flux import tiny

    clip_tok, t5_tok = tiny._clip_tokenizer(), tiny._t5_tokenizer()
    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16)
        with torch.no_grad():
            for p in transformer.parameters():
                p.mul_(0.5)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4,
                            layers_per_block=1, latent_channels=16, norm_num_groups=8, scaling_factor=0.3611,
                            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).to(torch.bfloat16)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=768, intermediate_size=512,
                                            num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                            projection_dim=768)).to(torch.bfloat16)
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=512, num_layers=1,
                                     num_heads=8, is_encoder_decoder=False, feed_forward_proj="gated-gelu",
                                     relative_attention_num_buckets=8)).to(torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def full_pipe():
    pipe = _full_size_pipeline()
    yield pipe
    del pipe
    torch.cuda.empty_cache()


@pytest.mark.timeout(300)  # 101 s on an H200 beside 15 xdist workers: close to the suite's 120 s
@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_size_flux_shapes_train(tmp_path, fluxkiln_context, full_pipe, checkpointing):
    from fluxkiln.engine import Dataset, DatasetItem, Model
    from fluxkiln.plugins.train.node import train_lora

    folder = solid_dataset(tmp_path / "data", n=2, size=512)
    dataset = Dataset(items=[DatasetItem(path=p, caption="a photo of TOK", name=p.name)
                             for p in sorted(folder.glob("*.png"))], fingerprint="full")
    ctx = fluxkiln_context(node="lora", type="train_lora", params={"checkpointing": checkpointing})
    model = Model(ref="random:flux-dev-full-size", kind="flux", key="full", info={"variant": "dev"},
                  loader=lambda: full_pipe, residency=ctx.models)
    torch.cuda.reset_peak_memory_stats()
    out = train_lora(ctx, model=model, dataset=dataset, steps=8, resolution=[512], lora_rank=16,
                     optimizer="adamw", gradient_checkpointing=checkpointing, save_every=0, caption_dropout_rate=0.0,
                     export_formats=["diffusers", "comfyui"], max_sequence_length=512)
    rows = [e.data for e in ctx.events if e.event == "node_progress" and e.data.get("metrics")]
    assert len(rows) == 8 and all(torch.isfinite(torch.tensor(r["metrics"]["loss"])) for r in rows)
    peak = torch.cuda.max_memory_allocated() / 2**30
    hist = [line.split(",") for line in (ctx.node_dir() / "metrics.csv").read_text().splitlines()[1:]]
    secs = [float(h[3]) for h in hist]
    per_step = (secs[-1] - secs[2]) / (len(secs) - 3)
    print(f"\nfull-size FLUX.1-dev LoRA rank 16, 512x512, gradient_checkpointing={checkpointing}: "
          f"{per_step:.3f} s/step, peak {peak:.1f} GiB")
    assert out["lora"].path.stat().st_size > 1_000_000
    assert "comfyui" in out["lora"].extra_files
    assert not any(getattr(full_pipe.transformer, "peft_config", None) or {}), "the training adapter is removed"
