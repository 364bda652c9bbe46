"""The full-size FLUX.1-dev and -schnell pipelines with random weights that ``fluxkiln bench`` times, and the
config-only folders that stand for them so recipes load them by path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FLUX_DEV = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
                axes_dims_rope=(16, 56, 56))
VAE_FULL = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
SCHEDULERS = {"dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096),
              "schnell": dict(shift=1.0, use_dynamic_shifting=False)}
WEIGHT_SCALE = 0.5  # random weights x 0.5 keep activations finite through 57 blocks
def build_full_size(device: str, depth: tuple[int, int] | None = None) -> dict[str, Any]:
    """FLUX.1-dev and -schnell pipelines of full size with random bf16 weights (schnell shares dev's blocks);
    ``depth`` = (double, single) blocks instead of 19 and 38 (every block keeps its full size)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxkiln.plugins.flux import tiny

    clip_tok, t5_tok = tiny._clip_tokenizer(), tiny._t5_tokenizer()
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        config = FLUX_DEV if depth is None else {**FLUX_DEV, "num_layers": depth[0], "num_single_layers": depth[1]}
        with torch.device(device):
            dev = FluxTransformer2DModel(**config)
            schnell = FluxTransformer2DModel(**{**FLUX_DEV, "guidance_embeds": False, "num_layers": 0,
                                                "num_single_layers": 0})
            vae = AutoencoderKL(**VAE_FULL)
            clip = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(clip_tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id))
            t5 = T5EncoderModel(T5Config(
                vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, relative_attention_num_buckets=32,
                decoder_start_token_id=0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for module in (dev, schnell, t5):
            for p in module.parameters():
                p.mul_(WEIGHT_SCALE)
    for module in (dev, schnell, vae, clip, t5):
        module.to(torch.bfloat16).eval().requires_grad_(False)
    schnell.transformer_blocks = dev.transformer_blocks
    schnell.single_transformer_blocks = dev.single_transformer_blocks
    schnell.register_to_config(num_layers=config["num_layers"], num_single_layers=config["num_single_layers"])
    return {variant: FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]), vae=vae,
                                  text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                                  transformer=transformer)
            for variant, transformer in (("dev", dev), ("schnell", schnell))}


def write_config_folder(folder: Path, pipe: Any) -> Path:
    """A diffusers-style folder with every component's config and tokenizer but no weights."""
    import shutil

    import diffusers

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    index: dict[str, Any] = {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__}
    for name, comp in pipe.components.items():
        if comp is None:
            continue
        index[name] = [type(comp).__module__.split(".")[0], type(comp).__name__]
        sub = folder / name
        sub.mkdir()
        if hasattr(comp, "save_config"):  # diffusers models and schedulers
            comp.save_config(sub)
        elif hasattr(comp, "config") and hasattr(comp.config, "save_pretrained"):  # transformers models
            comp.config.save_pretrained(sub)
        else:  # tokenizers
            comp.save_pretrained(sub)
    (folder / "RANDOM_WEIGHTS.txt").write_text("Configs only: `fluxkiln bench` built this pipeline with random "
                                                "weights in memory; this folder cannot be loaded.\n")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
