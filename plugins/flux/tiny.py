"""Build the tiny built-in FLUX.1 pipelines (``builtin:tiny-flux``, ``builtin:tiny-flux-schnell``).

Every component of a real FLUX.1 pipeline — FluxTransformer2DModel, AutoencoderKL
(4 blocks, so ``vae_scale_factor`` is 8 and real pixel sizes work), CLIP and T5
text encoders, their tokenizers and the flow-matching scheduler — is built in
code from a fixed seed with tiny sizes, saved once to
``builtin_models_dir()/<name>-v2/`` (built in a temporary folder and renamed into
place, so racing processes are safe) and from then on loaded with
``FluxPipeline.from_pretrained(folder)``, exactly like a real local folder.
Nothing is downloaded.

The VAE is colour-faithful, so tests can check pixels (a LoRA trained on red
makes red pictures): a random VAE's GroupNorm layers normalise a flat image's
colour away.  Here the residual stream carries ``(+rgb, -rgb, A, A)`` (A a large
constant), so every one-group GroupNorm sees a colour-independent mean and an
almost constant spread and acts as a fixed affine map; down-samplers average
2x2, up-samplers copy, the random residual branches are damped, and the two
output convolutions are fitted by least squares so that flat colours round-trip.
A latent is then a fixed linear map (``LATENT_FROM_RGB``) of its 8x8 block's mean
colour, and any latent decodes to a colour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VERSION = "v2"  # bump when the design changes, so stale builds are not reused
SEED = 20240801
NAMES = {"dev": "tiny-flux", "schnell": "tiny-flux-schnell"}
BUILTIN_REFS = {f"builtin:{name}": variant for variant, name in NAMES.items()}

# Sizes: inner dim 32 (2 heads of 16, rope axes 4+6+6), 1 double + 2 single blocks,
# 4 latent channels (packed 2x2 -> 16 transformer input channels).
TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=(4, 6, 6))
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=0,
           latent_channels=4, norm_num_groups=1, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)

# Colour-faithful VAE (see the module docstring): latent (scaled as the pipeline scales it) of a flat colour
# in [-1, 1]: brightness, red-green, yellow-blue and a mix, so every channel carries colour.
LATENT_FROM_RGB = ((0.6, 0.6, 0.6), (1.0, -1.0, 0.0), (0.5, 0.5, -1.0), (-0.3, 0.5, -0.2))
ANCHOR = 32.0  # the constant stream channels: large, so GroupNorm's spread hardly depends on the colour
DAMPING = 0.1  # random residual branches scaled by this: a little texture, colours kept
LOGVAR = -12.0  # latent log-variance: near-deterministic encodings


def tiny_flux_path(variant: str = "dev") -> Path:
    """The folder of the tiny FLUX pipeline for ``variant`` ("dev" or "schnell"), built on first use."""
    if variant not in NAMES:
        raise ValueError(f"unknown tiny FLUX variant {variant!r}; use 'dev' or 'schnell'")
    from fluxkiln.engine.paths import build_once

    from .load import quiet_loading

    def build(folder: Path) -> None:
        with quiet_loading():
            build_tiny_flux(variant).save_pretrained(folder, safe_serialization=True)

    return build_once(f"{NAMES[variant]}-{VERSION}", "model_index.json", build)


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
        vae = _colour_faithful(AutoencoderKL(**VAE))
        torch.manual_seed(SEED + 2)
        clip = _clip_encoder(clip_tok)
        torch.manual_seed(SEED + 3)
        t5 = _t5_encoder(t5_tok)
    if variant == "dev":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    for module in (transformer, vae, clip, t5):
        module.eval()  # as from_pretrained leaves them: T5's dropout would otherwise change every call's output
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def _colour_faithful(vae: Any) -> Any:
    """Set the random VAE's stream-carrying layers so flat colours survive encode -> decode (in place)."""
    import torch

    enc, dec = vae.encoder, vae.decoder
    rgb_to_latent = torch.tensor(LATENT_FROM_RGB) / vae.config.scaling_factor  # unscaled latent = this @ rgb + shift
    shift = vae.config.shift_factor
    latent_to_rgb = torch.linalg.pinv(rgb_to_latent)
    eye8, eye3 = torch.eye(8), torch.eye(3)
    with torch.no_grad():
        for part in (enc, dec):
            for name, module in part.named_modules():
                if name.endswith("conv2"):  # the last conv of each residual branch
                    module.weight.mul_(DAMPING)
                    module.bias.mul_(DAMPING)
            # Undo the normalisation of the colour-free stream (mean A/4, spread A*sqrt(3)/4), so GroupNorm is
            # about x + 3: colours stay well apart in bfloat16, and the SiLU after it is nearly linear.
            part.conv_norm_out.weight.fill_(ANCHOR * 3**0.5 / 4)
            part.conv_norm_out.bias.fill_(ANCHOR / 4 + 3.0)
        _centre_tap(enc.conv_in, torch.cat([eye3, -eye3, torch.zeros(2, 3)]), _stream_bias(torch.zeros(3)))
        for block in enc.down_blocks:
            for down in block.downsamplers or []:
                down.conv.weight.zero_()
                down.conv.weight[:, :, :2, :2] = eye8[:, :, None, None] / 4  # 2x2 average, never the padding
                down.conv.bias.zero_()
        for block in dec.up_blocks:
            for up in block.upsamplers or []:
                _centre_tap(up.conv, eye8, torch.zeros(8))
        _centre_tap(dec.conv_in, torch.cat([latent_to_rgb, -latent_to_rgb, torch.zeros(2, 4)]),
                    _stream_bias(-latent_to_rgb.sum(1) * shift))
        colours = _calibration_colours()
        latents = colours @ rgb_to_latent.T + shift
        _fit_output(enc.conv_out, lambda: enc(_flat(colours, 64)),
                    torch.cat([latents, torch.full((len(colours), 4), LOGVAR)], 1))
        _fit_output(dec.conv_out, lambda: dec(_flat(latents, 8)), colours)
    return vae


def _stream_bias(rgb_bias: Any) -> Any:
    import torch

    return torch.cat([rgb_bias, -rgb_bias, torch.tensor([ANCHOR, ANCHOR])])


def _centre_tap(conv: Any, matrix: Any, bias: Any) -> None:
    """Make a 3x3 convolution a per-pixel linear map."""
    conv.weight.zero_()
    conv.weight[:, :, 1, 1] = matrix
    conv.bias.copy_(bias)


def _calibration_colours() -> Any:
    """Flat colours in [-1, 1] to fit the output convolutions on: fixed random ones and the cube's corners."""
    import itertools

    import torch

    corners = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=3)))
    return torch.cat([torch.rand(256, 3, generator=torch.Generator().manual_seed(SEED)) * 2 - 1, corners])


def _flat(values: Any, size: int) -> Any:
    """A batch of flat size x size images, one per row of ``values``."""
    return values[:, :, None, None].expand(-1, -1, size, size).contiguous()


def _fit_output(conv: Any, run: Any, targets: Any) -> None:
    """Fit ``conv`` (centre tap, first 3 inputs) by least squares so that ``run()``'s flat inputs give ``targets``."""
    import torch

    seen: list[Any] = []
    hook = conv.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        run()
    finally:
        hook.remove()
    x = seen[0]
    feats = x[:, :3, x.shape[2] // 2, x.shape[3] // 2]  # an inner pixel: away from the zero padding
    design = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
    solution = torch.linalg.lstsq(design, targets.double()).solution.float()
    conv.weight.zero_()
    conv.weight[:, :3, 1, 1] = solution[:-1].T
    conv.bias.copy_(solution[-1])


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


def _clip_tokenizer(model_max_length: int = 77) -> Any:
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
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


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
