"""The quality guard of ``fluxkiln bench``: fixed transformer and block inputs, and the relative difference of a
fast path's output from the eager bf16 one."""

from __future__ import annotations

from typing import Any


def guard_inputs(pipe: Any, size: int, variant: str, device: str) -> dict[str, Any]:
    """Fixed transformer inputs of the shapes sampling uses (so compiled graphs are reused)."""
    import torch

    from fluxkiln.plugins.flux.sample import MAX_TEXT_TOKENS

    t = pipe.transformer
    cfg, dtype = t.config, t.dtype
    side = size // (pipe.vae_scale_factor * 2)
    gen = torch.Generator().manual_seed(11)
    tokens = MAX_TEXT_TOKENS[variant]

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    return dict(hidden_states=rand(1, side * side, cfg.in_channels), encoder_hidden_states=rand(1, tokens,
                cfg.joint_attention_dim), pooled_projections=rand(1, cfg.pooled_projection_dim),
                timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((1,), 3.0, device=device) if cfg.guidance_embeds else None,
                img_ids=pipe._prepare_latent_image_ids(1, side, side, device, dtype),
                txt_ids=torch.zeros(tokens, 3, device=device, dtype=dtype))


def block_inputs(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Inputs of the first double-stream block, derived from :func:`guard_inputs` (a more sensitive guard)."""
    import torch

    t = pipe.transformer
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        rot = t.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]], dim=0))
        return dict(hidden_states=t.x_embedder(inputs["hidden_states"]),
                    encoder_hidden_states=t.context_embedder(inputs["encoder_hidden_states"]),
                    temb=torch.randn(1, t.inner_dim, generator=gen).to(inputs["hidden_states"]),
                    image_rotary_emb=rot)


def block_output(pipe: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return pipe.transformer.transformer_blocks[0](**inputs)[1].float().cpu()


def rel_diff(got: Any, ref: Any) -> float:
    """‖got − ref‖ / ‖ref‖ of two tensors or two PIL images (as float arrays)."""
    import numpy as np

    a = np.asarray(got.float().numpy() if hasattr(got, "numpy") else got, dtype=np.float64)
    b = np.asarray(ref.float().numpy() if hasattr(ref, "numpy") else ref, dtype=np.float64)
    denom = float(np.linalg.norm(b)) or 1.0
    return round(float(np.linalg.norm(a - b)) / denom, 6)
