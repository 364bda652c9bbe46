"""``builtin:tiny-clip``: a tiny CLIP model (text and vision towers, tokenizer, image processor) built in
code from a fixed seed, saved once and loaded with ``from_pretrained`` like a real one.  For tests and
demos of the ``evaluate`` node's CLIP metric; its scores mean nothing (its embeddings are tilted to one
side so that they are mostly positive and vary with the inputs)."""

from __future__ import annotations

from pathlib import Path

REF = "builtin:tiny-clip"
VERSION = "v2"
SEED = 20261128


def resolve_builtin(ref: str) -> str | None:
    return str(tiny_clip_path()) if ref.strip() == REF else None


def tiny_clip_path() -> Path:
    """The folder of the tiny CLIP model, built on first use."""
    from fluxkiln.engine.paths import build_once

    return build_once(f"tiny-clip-{VERSION}", "config.json", build_tiny_clip)


def build_tiny_clip(folder: Path) -> None:
    """Build the tiny CLIP model and write it (model, tokenizer, image processor) into ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from fluxkiln.plugins.flux.load import quiet_loading
    from fluxkiln.plugins.flux.tiny import _clip_tokenizer

    tok = _clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    with torch.random.fork_rng(devices=[]), quiet_loading():
        torch.manual_seed(SEED)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        with torch.no_grad():  # embeddings lean to one side, so cosine similarities (scores) are mostly > 0
            for proj in (model.visual_projection, model.text_projection):
                proj.weight.abs_()
            model.vision_model.post_layernorm.bias.add_(0.5)
            model.text_model.final_layer_norm.bias.add_(0.5)
        images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        model.save_pretrained(folder, safe_serialization=True)
        CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
