"""The architecture of mini-flux: sizes of every FluxPipeline component, its tokenizers and schedulers.

Shared by the training script (which builds the modules with random weights and trains them) and by the
tests.  The sizes are chosen so that one 256x256 image at 28 steps runs in about a second on a 2-core CPU
and both pipelines together stay under 30 MB in float16.
"""

from __future__ import annotations

from typing import Any

from .world import VOCABULARY

NAMES = {"dev": "mini-flux", "schnell": "mini-flux-schnell"}
BUILTIN_REFS = {f"builtin:{name}": variant for variant, name in NAMES.items()}
NATIVE = 256  # native image side in pixels
TEXT_TOKENS = 64  # T5 sequence length (the tokenizer's model_max_length; the pipeline pads to it)
CLIP_TOKENS = 160  # long enough for every prompt of the grammar, spelled out byte by byte

# hidden 128 = 2 heads of 64 (rope axes 8 + 28 + 28), 4 double-stream + 8 single-stream blocks
TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
                   num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64,
                   axes_dims_rope=(8, 28, 28))
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
           latent_channels=16, norm_num_groups=8, sample_size=256, scaling_factor=1.0, shift_factor=0.0,
           use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
T5 = dict(d_model=128, d_kv=64, d_ff=256, num_layers=3, num_heads=2, relative_attention_num_buckets=16,
          relative_attention_max_distance=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
          decoder_start_token_id=0, dropout_rate=0.0)
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=CLIP_TOKENS, projection_dim=64)
SCHEDULERS = {
    "dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096),
    "schnell": dict(shift=1.0, use_dynamic_shifting=False),
}


def t5_tokenizer(more: tuple[str, ...] = ()) -> Any:
    """A T5 unigram tokenizer: every word of mini-flux's vocabulary is one piece; anything else is spelled out
    in single characters (so unknown words still encode, and the model learns to ignore them).  ``more`` words
    (a base trained on more shapes) become pieces after all the others, so every earlier id stays the same."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(word_piece(word), -1.0) for word in VOCABULARY]
    for code in range(33, 127):
        pieces.append((chr(code), -3.0))
        pieces.append(("\u2581" + chr(code), -3.5))
    pieces += [(word_piece(word), -1.0) for word in more]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TEXT_TOKENS)


def word_piece(word: str) -> str:
    """The piece of :func:`t5_tokenizer`'s vocabulary that stands for the whole ``word``."""
    return "\u2581" + word


def knows_word(tokenizer: Any, word: str) -> bool:
    """Whether ``word`` is one piece of a mini-flux T5 tokenizer's vocabulary (not spelled out)."""
    return word_piece(word) in tokenizer.get_vocab()


def clip_tokenizer() -> Any:
    """A CLIP byte-level BPE tokenizer without merges: every byte is a token (the tiny model's, longer)."""
    from fluxkiln.plugins.flux.tiny import _clip_tokenizer

    return _clip_tokenizer(CLIP_TOKENS)


def build_modules(variant: str = "dev") -> dict[str, Any]:
    """Every component of a mini-flux FluxPipeline with fresh random weights (the current torch seed)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip_cfg = CLIPTextConfig(vocab_size=len(clip_tok), bos_token_id=clip_tok.bos_token_id,
                              eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id, **CLIP)
    t5_cfg = T5Config(vocab_size=len(t5_tok), pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, **T5)
    return dict(transformer=FluxTransformer2DModel(guidance_embeds=variant == "dev", **TRANSFORMER),
                vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(clip_cfg), tokenizer=clip_tok,
                text_encoder_2=T5EncoderModel(t5_cfg), tokenizer_2=t5_tok,
                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]))


def pipeline(modules: dict[str, Any]) -> Any:
    """A FluxPipeline from :func:`build_modules`' dict (or trained replacements of its modules)."""
    from diffusers import FluxPipeline

    return FluxPipeline(**modules)
