"""The flow-matching objective of FLUX: noise a batch of latents at sampled times, predict the velocity.

``x_t = (1 - t) * x_0 + t * noise``; the transformer predicts ``noise - x_0``;
the loss is their mean squared error.  Times come from one of four samplers
(ai-toolkit's names): ``sigmoid`` (logit-normal, the default), ``linear``
(uniform), ``shift`` (uniform pushed towards noise by a fixed shift of 3) and
``flux_shift`` (logit-normal shifted by an amount that grows with the image's
token count, as FLUX.1-dev's sampler does).  All randomness comes from one
CPU generator whose state is saved in checkpoints.  :func:`preservation_loss` is the optional second term:
the LoRA's prediction kept at the base model's where the caption names the class instead of the trigger.
"""

from __future__ import annotations

import math
from typing import Any

FIXED_SHIFT = 3.0
BASE_SEQ, MAX_SEQ, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def flux_mu(seq_len: int) -> float:
    """FLUX.1-dev's resolution-dependent shift, linear in the number of image tokens."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ - BASE_SEQ)
    return BASE_SHIFT + slope * (seq_len - BASE_SEQ)


def sample_times(n: int, gen: Any, method: str, seq_len: int) -> Any:
    """``n`` times in (0, 1) drawn with ``method``."""
    import torch

    if method == "linear":
        t = torch.rand(n, generator=gen)
    elif method == "shift":
        u = torch.rand(n, generator=gen)
        t = FIXED_SHIFT * u / (1 + (FIXED_SHIFT - 1) * u)
    elif method == "flux_shift":
        u = torch.sigmoid(torch.randn(n, generator=gen))
        em = math.exp(flux_mu(seq_len))
        t = em / (em + (1 / u - 1))
    else:
        t = torch.sigmoid(torch.randn(n, generator=gen))
    return t.clamp(1e-4, 1 - 1e-4)


def pack(latents: Any) -> Any:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): FLUX's 2x2 patch sequence (diffusers' layout)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int, device: Any, dtype: Any) -> Any:
    """Position ids (row, column) of the packed latent tokens, as FluxPipeline builds them."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flow_loss(transformer: Any, latents: Any, embeds: Any, pooled: Any, gen: Any, method: str,
              device: Any, dtype: Any, part: range | None = None, token_weights: Any = None) -> Any:
    """One batch's loss (a scalar float32 tensor with a graph to the trainable weights).

    With ``part`` (data-parallel training) the noise and times are drawn for the whole batch, so the
    generator stays in step on every rank, and the loss covers only the samples in ``part`` (None if empty).
    ``token_weights`` (batch, packed tokens) weighs each token's squared error (a weighted mean: weights of
    one everywhere give the plain loss).
    """
    import torch.nn.functional as F

    drawn = _draw(latents, embeds, pooled, gen, method, part, device, dtype)
    if drawn is None:
        return None
    x0, noise = drawn[:2]
    pred = _velocity(transformer, *drawn, device, dtype)
    if token_weights is None:
        return F.mse_loss(pred.float(), pack(noise - x0).float())
    if part is not None:
        token_weights = token_weights[part.start:part.stop]
    w = token_weights.to(pred.device).float()
    err = (pred.float() - pack(noise - x0).float()).pow(2).mean(-1)
    return (w * err).sum() / w.sum().clamp_min(1e-8)  # all-black masks at weight 0: no signal, not 0/0


def preservation_loss(transformer: Any, latents: Any, embeds: Any, pooled: Any, gen: Any, method: str,
                      device: Any, dtype: Any, part: range | None = None, guidance: float = 1.0) -> Any:
    """How far the adapted transformer's velocity is from the base model's (its LoRAs switched off) on the same
    noisy latents and captions (differential output preservation: the captions name the class, not the trigger,
    so the LoRA learns to leave everything but its trigger word alone).  Noise, times and ``part`` as in
    :func:`flow_loss`; None for an empty part.  ``guidance`` is the guidance both predictions are made at (a
    guidance-distilled model's: the one it will be sampled at holds what sampling reads)."""
    import torch
    import torch.nn.functional as F

    drawn = _draw(latents, embeds, pooled, gen, method, part, device, dtype)
    if drawn is None:
        return None
    with torch.no_grad():
        transformer.disable_adapters()
        try:
            target = _velocity(transformer, *drawn, device, dtype, guidance)
        finally:
            transformer.enable_adapters()
    pred = _velocity(transformer, *drawn, device, dtype, guidance)
    return F.mse_loss(pred.float(), target.float())


def _draw(latents: Any, embeds: Any, pooled: Any, gen: Any, method: str, part: range | None, device: Any,
          dtype: Any) -> tuple[Any, Any, Any, Any, Any] | None:
    """(latents, noise, times, embeds, pooled): noise and times drawn for the whole batch, then ``part`` of all,
    the latents and noise on ``device`` in ``dtype``."""
    import torch

    b, _c, h, w = latents.shape
    noise = torch.randn(latents.shape, generator=gen)
    t = sample_times(b, gen, method, (h // 2) * (w // 2))
    if part is not None:
        if not len(part):
            return None
        pick = slice(part.start, part.stop)
        latents, noise, t, embeds, pooled = latents[pick], noise[pick], t[pick], embeds[pick], pooled[pick]
    return latents.to(device, dtype), noise.to(device, dtype), t, embeds, pooled


def _velocity(transformer: Any, x0: Any, noise: Any, t: Any, embeds: Any, pooled: Any, device: Any,
              dtype: Any, guidance: float = 1.0) -> Any:
    """The transformer's velocity prediction at ``x_t`` (packed tokens), at ``guidance`` for a guidance-distilled
    model."""
    import torch

    b, _c, h, w = x0.shape
    tt = t.view(b, 1, 1, 1).to(device, dtype)
    xt = (1 - tt) * x0 + tt * noise
    scale = torch.full((b,), guidance, device=device, dtype=dtype) if transformer.config.guidance_embeds else None
    return transformer(hidden_states=pack(xt), timestep=t.to(device, dtype), guidance=scale,
                       pooled_projections=pooled.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                       txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
                       img_ids=image_ids(h, w, device, dtype), return_dict=False)[0]
