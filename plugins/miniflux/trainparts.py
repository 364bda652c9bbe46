"""Pieces of mini-flux's training: batches of rendered scenes, text encoding as FluxPipeline does it,
flow-matching inputs, EMA, and the wall-clock learning-rate schedule.  Used by :mod:`.train`."""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from fluxkiln.plugins.flux.sizes import ASPECT_RATIOS

from .config import CLIP_TOKENS, NATIVE, TEXT_TOKENS
from .render import render
from .world import random_scene, realise

# every Replicate aspect ratio at megapixels = "0.25" (half of each 1 MP side)
SIZES_025 = sorted({(w // 2, h // 2) for w, h in ASPECT_RATIOS.values()})


@dataclass
class Batch:
    images: Any  # (B, 3, H, W) in [-1, 1]
    prompts: list[str]


def pick_size(rng: random.Random, native: int, multi_res: float) -> tuple[int, int]:
    """The native square most of the time, else one of the 0.25 MP aspect-ratio sizes (scaled with ``native``)."""
    if rng.random() >= multi_res:
        return native, native
    w, h = rng.choice(SIZES_025)
    scale = native / NATIVE
    return max(32, round(w * scale / 16) * 16), max(32, round(h * scale / 16) * 16)


def batch_for(size: tuple[int, int], base_batch: int, native: int) -> int:
    """Fewer images per batch for bigger sizes, so every batch has about the same number of tokens."""
    return max(2, base_batch * native * native // (size[0] * size[1]))


def make_batch(rng: random.Random, n: int, size: tuple[int, int], device: Any, *, fillers: float = 0.15,
               supersample: int = 2) -> Batch:
    w, h = size
    scenes = [random_scene(rng, split="train", fillers=fillers) for _ in range(n)]
    layouts = [realise(s, rng, w / h) for s in scenes]
    return Batch(render(layouts, w, h, device, supersample), [s.prompt for s in scenes])


class TextEncoder:
    """Both text encoders, called exactly as FluxPipeline calls them (no attention masks, padded)."""

    def __init__(self, clip: Any, clip_tok: Any, t5: Any, t5_tok: Any, device: Any) -> None:
        self.clip, self.clip_tok, self.t5, self.t5_tok, self.device = clip, clip_tok, t5, t5_tok, device

    def ids(self, prompts: list[str]) -> tuple[Any, Any]:
        c = self.clip_tok(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                          return_tensors="pt").input_ids
        t = self.t5_tok(prompts, padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        return c.to(self.device), t.to(self.device)

    def __call__(self, prompts: list[str]) -> tuple[Any, Any]:
        """(T5 sequence embeddings (B, L, D), CLIP pooled embeddings (B, P))."""
        c, t = self.ids(prompts)
        pooled = self.clip(c, output_hidden_states=False).pooler_output
        seq = self.t5(t).last_hidden_state
        return seq, pooled


def latents_of(vae: Any, images: Any) -> Any:
    """Normalised latents (as the pipeline denoises them) of [-1, 1] images."""
    import torch

    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def pack(latents: Any) -> tuple[Any, Any]:
    """FluxPipeline's 2x2 packing: (B, C, h, w) -> (B, h/2 * w/2, 4C) and the image position ids."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return packed, ids


def shifted_sigmas(n: int, seq_len: int, device: Any, generator: Any = None) -> Any:
    """Training noise levels: logit-normal, shifted for the image's token count as the dev scheduler shifts."""
    import torch
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    t = torch.sigmoid(torch.randn(n, device=device, generator=generator))
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def forward(transformer: Any, x: Any, sigma: Any, ids: Any, seq: Any, pooled: Any, guidance: Any = None) -> Any:
    """One transformer call as the pipeline makes it (timestep = sigma, guidance raw)."""
    import torch

    txt_ids = torch.zeros(seq.shape[1], 3, device=x.device, dtype=x.dtype)
    return transformer(hidden_states=x, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=seq, txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]


class Ema:
    """Exponential moving average of some modules' parameters."""

    def __init__(self, modules: list[Any], decay: float) -> None:
        self.modules, self.decay = modules, decay
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]
        self.steps = 0

    def update(self) -> None:
        """Move the averages towards the live weights (a short average at first, so the start fades fast)."""
        import torch

        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for live, avg in zip(self.modules, self.shadow, strict=True):
                torch._foreach_lerp_(list(avg.parameters()), list(live.parameters()), 1 - decay)


class Clock:
    """A phase's wall-clock budget and the learning rate along it (warm-up, then cosine to 10 %)."""

    def __init__(self, seconds: float, lr: float, warmup: int) -> None:
        self.start, self.seconds, self.lr, self.warmup = time.monotonic(), seconds, lr, warmup

    @property
    def fraction(self) -> float:
        return min(1.0, (time.monotonic() - self.start) / max(self.seconds, 1e-9))

    def done(self) -> bool:
        return self.fraction >= 1.0

    def rate(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return self.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.fraction)))

    def set(self, optimizer: Any, step: int) -> float:
        lr = self.rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
