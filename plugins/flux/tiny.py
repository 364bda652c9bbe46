"""Build the tiny built-in FLUX.1 pipelines (``builtin:tiny-flux``, ``builtin:tiny-flux-schnell``).

Every component of a real FLUX.1 pipeline — FluxTransformer2DModel, AutoencoderKL
(4 blocks, so ``vae_scale_factor`` is 8 and real pixel sizes work), CLIP and T5
text encoders, their tokenizers and the flow-matching scheduler — is built in
code from a fixed seed with tiny sizes, saved once to
``builtin_models_dir()/<name>-v1/`` (built in a temporary folder and renamed into
place, so racing processes are safe) and from then on loaded with
``FluxPipeline.from_pretrained(folder)``, exactly like a real local folder.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

VERSION = "v1"
SEED = 20240801
NAMES = {"dev": "tiny-flux", "schnell": "tiny-flux-schnell"}
BUILTIN_REFS = {f"builtin:{name}": variant for variant, name in NAMES.items()}

# Sizes: inner dim 32 (2 heads of 16, rope axes 4+6+6), 1 double + 2 single blocks,
# 4 latent channels (packed 2x2 -> 16 transformer input channels).
TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=(4, 6, 6))
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=0,
           latent_channels=4, norm_num_groups=2, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)


def tiny_flux_path(variant: str = "dev") -> Path:
    """The folder of the tiny FLUX pipeline for ``variant`` ("dev" or "schnell"), built on first use."""
    if variant not in NAMES:
        raise ValueError(f"unknown tiny FLUX variant {variant!r}; use 'dev' or 'schnell'")
    from fluxkiln.engine.paths import builtin_models_dir

    root = builtin_models_dir()
    final = root / f"{NAMES[variant]}-{VERSION}"
    if (final / "model_index.json").is_file():
        return final
    from .load import quiet_loading

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        with quiet_loading():
            build_tiny_flux(variant).save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_builtin(ref: str) -> str | None:
    """``builtin:tiny-flux`` / ``builtin:tiny-flux-schnell`` -> folder path; None for other refs."""
    variant = BUILTIN_REFS.get(ref)
    return str(tiny_flux_path(variant)) if variant else None


def build_tiny_flux(variant: str = "dev") -> Any:
    """Construct (not load) a tiny FluxPipeline, deterministically, without touching disk or network."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        transformer = FluxTransformer2DModel(guidance_embeds=variant == "dev", **TRANSFORMER)
        torch.manual_seed(SEED + 1)
        vae = AutoencoderKL(**VAE)
        torch.manual_seed(SEED + 2)
        clip = _clip_encoder(clip_tok)
        torch.manual_seed(SEED + 3)
        t5 = _t5_encoder(t5_tok)
    if variant == "dev":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255 (GPT-2's table, built here)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer with no merges: every byte is a token (so every prompt encodes distinctly)."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> Any:
    """A T5 unigram tokenizer over single printable characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for code in range(33, 127):
        pieces.append((chr(code), -3.0))
        pieces.append(("\u2581" + chr(code), -3.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_encoder(tok: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return CLIPTextModel(cfg)


def _t5_encoder(tok: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=37, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return T5EncoderModel(cfg)


def describe(folder: Path) -> dict[str, Any]:
    """Read the model index of a saved pipeline folder (used in tests and logs)."""
    return json.loads((Path(folder) / "model_index.json").read_text())
