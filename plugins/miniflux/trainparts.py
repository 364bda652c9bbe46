"""Pieces of mini-flux's training: batches of rendered scenes, text encoding as FluxPipeline does it,
flow-matching inputs, EMA, and the step-based learning-rate schedule.  Used by :mod:`.train`."""

from __future__ import annotations

import copy
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from fluxkiln.plugins.flux.sizes import ASPECT_RATIOS

from .config import CLIP_TOKENS, NATIVE, TEXT_TOKENS
from .render import render
from .world import SHAPES, Scene, random_scene, realise

T0 = time.monotonic()  # the training run's start (for the log's timestamps and the deadline)


QUIET = [False]  # True on every rank but the first of a distributed run


def log(msg: str) -> None:
    if not QUIET[0]:
        print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# every Replicate aspect ratio at megapixels = "0.25" (half of each 1 MP side)
SIZES_025 = sorted({(w // 2, h // 2) for w, h in ASPECT_RATIOS.values()})


@dataclass
class Batch:
    images: Any  # (B, 3, H, W) in [-1, 1]
    prompts: list[str]
    scenes: list[Scene] | None = None
    cover: Any = None  # (B, H, W) object coverage in [0, 1], when asked for


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
               supersample: int = 2, two: float = 0.4, masks: bool = False, pairs: float = 0.0,
               shapes: tuple[str, ...] = SHAPES) -> Batch:
    """``n`` random training scenes drawn; with ``pairs``, that share of the odd-numbered scenes is the scene
    before it with the first object's and the background's colours exchanged (where that is a training
    scene), so a model that only knows which colours a prompt names cannot fit both."""
    from .roles import swap_roles

    scenes: list[Scene] = []
    for k in range(n):
        swapped = swap_roles(scenes[-1]) if k % 2 and rng.random() < pairs else None
        scenes.append(swapped or random_scene(rng, two=two, split="train", fillers=fillers, shapes=shapes))
    return draw_scenes(scenes, rng, size, device, supersample=supersample, masks=masks)


def draw_scenes(scenes: list[Scene], rng: random.Random, size: tuple[int, int], device: Any, *,
                supersample: int = 2, masks: bool = False) -> Batch:
    w, h = size
    layouts = [realise(s, rng, w / h) for s in scenes]
    drawn = render(layouts, w, h, device, supersample, masks=masks)
    images, cover = drawn if masks else (drawn, None)
    return Batch(images, [s.prompt for s in scenes], scenes, cover)


PLAIN = re.compile(r"[a-z]+( [a-z]+)*")


class WordTokens:
    """A tokenizer's padded ids of prompts, assembled from a cache of each word's ids.

    Both of mini-flux's tokenizers split at spaces and never join words (CLIP: one token per byte; T5: one
    piece per known word, single characters otherwise), so lower-case prompts of single-space-separated
    words tokenise word by word: the same ids as the tokenizer's own call, hundreds of times faster.
    Anything else goes through the tokenizer itself."""

    def __init__(self, tokenizer: Any, length: int) -> None:
        self.tok, self.length = tokenizer, length
        marked = tokenizer("x").input_ids
        bare = tokenizer("x", add_special_tokens=False).input_ids
        at = next(i for i in range(len(marked)) if marked[i:i + len(bare)] == bare)
        self.prefix, self.suffix = marked[:at], marked[at + len(bare):]
        self.words: dict[str, list[int]] = {}

    def one(self, prompt: str) -> list[int]:
        if not PLAIN.fullmatch(prompt):
            return self.tok(prompt, padding="max_length", max_length=self.length, truncation=True).input_ids
        body: list[int] = []
        for word in prompt.split(" "):
            body += self.word_ids(word)
        body = body[:self.length - len(self.prefix) - len(self.suffix)]
        ids = self.prefix + body + self.suffix
        return ids + [self.tok.pad_token_id] * (self.length - len(ids))

    def word_ids(self, word: str) -> list[int]:
        """The ids of one word (no spaces), cached."""
        ids = self.words.get(word)
        if ids is None:
            ids = self.words[word] = self.tok(word, add_special_tokens=False).input_ids
        return ids

    def __call__(self, prompts: list[str]) -> Any:
        import torch

        return torch.tensor([self.one(p) for p in prompts], dtype=torch.long)


class TextEncoder:
    """Both text encoders, called exactly as FluxPipeline calls them (no attention masks, padded)."""

    def __init__(self, clip: Any, clip_tok: Any, t5: Any, t5_tok: Any, device: Any) -> None:
        self.clip, self.t5, self.device = clip, t5, device
        self.clip_tok, self.t5_tok = WordTokens(clip_tok, CLIP_TOKENS), WordTokens(t5_tok, TEXT_TOKENS)

    def ids(self, prompts: list[str]) -> tuple[Any, Any]:
        return self.clip_tok(prompts).to(self.device), self.t5_tok(prompts).to(self.device)

    def __call__(self, prompts: list[str]) -> tuple[Any, Any]:
        """(T5 sequence embeddings (B, L, D), CLIP pooled embeddings (B, P))."""
        return self.encode(*self.ids(prompts))

    def encode(self, clip_ids: Any, t5_ids: Any) -> tuple[Any, Any]:
        """(T5 sequence embeddings, CLIP pooled embeddings) of token ids from :meth:`ids`."""
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        seq = self.t5(t5_ids).last_hidden_state
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


class Plan:
    """A phase's learning-rate schedule by steps (linear warm-up, then cosine to 10 % at the last step).

    The number of steps comes from the phase's budget in seconds and the step time measured from step
    ``probe`` on: planned at ``2 * probe`` and again at ``10 * probe`` and ``40 * probe`` (the first steps on a GPU
    are slower than the rest, which left a quarter of a phase's budget unused); the schedule depends on steps
    only.  The budget is also a hard stop.
    With several ranks, rank 0's clock decides both, every ``every`` steps (and at the planning step), so
    all ranks stop at the same step."""

    def __init__(self, seconds: float, lr: float, warmup: int, probe: int = 15, world: Any = None,
                 every: int = 10) -> None:
        self.start, self.seconds, self.lr, self.warmup, self.probe = time.monotonic(), seconds, lr, warmup, probe
        self.world, self.every = world, every
        self.total: int | None = None
        self._probe_start = self.start
        self._stop = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def done(self, step: int) -> bool:
        """True once the planned steps are taken (or the budget is spent); plans the steps at ``2 * probe`` and
        again at ``10 * probe`` and ``40 * probe``."""
        if step == self.probe:
            self._probe_start = time.monotonic()
        planning = step in (2 * self.probe, 10 * self.probe, 40 * self.probe) and not self._stop and (
            self.total is None or step < self.total)
        if planning:
            per_step = (time.monotonic() - self._probe_start) / (step - self.probe)
            self.total = max(step + 1, int(step + (self.seconds - self.elapsed()) / per_step + 1e-6))
        if self.world is None or self.world.size == 1:
            self._stop = self.elapsed() >= self.seconds
        elif planning or step % self.every == 0:
            stop, total = self.world.agree(float(self.elapsed() >= self.seconds), float(self.total or -1))
            self._stop, self.total = stop > 0, (int(total) if total > 0 else None)
        return self._stop or (self.total is not None and step >= self.total)

    def rate(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        fraction = min(1.0, step / self.total) if self.total else 0.0
        return self.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction)))

    def set(self, optimizer: Any, step: int) -> float:
        """Set every parameter group's rate (times the group's own ``scale``, 1 if none)."""
        lr = self.rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("scale", 1.0)
        return lr


PLANNED = ("vae", "pool", "text", "base", "guide", "schnell")  # the phases with a budget, in order


def budget(cfg: Any, phase: str) -> float:
    """The phase's planned seconds, cut so that the later phases' plans still fit before the deadline."""
    later = sum(getattr(cfg, f"{p}_seconds") for p in PLANNED[PLANNED.index(phase) + 1:])
    left = cfg.deadline - (time.monotonic() - T0) - later - cfg.reserve
    return max(0.25 * getattr(cfg, f"{phase}_seconds"), min(getattr(cfg, f"{phase}_seconds"), left))


def autocast(device: str) -> Any:
    import torch

    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")


def adamw(params: Any, lr: float, device: str, weight_decay: float = 0.0) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay, fused=device == "cuda")


def noisy(latents: Any) -> tuple[Any, Any, Any, Any]:
    """Flow-matching inputs of normalised latents: (noisy packed latents, sigma, image ids, velocity target)."""
    import torch

    packed, ids = pack(latents)
    noise = torch.randn_like(packed)
    sigma = shifted_sigmas(len(packed), packed.shape[1], packed.device)
    xt = (1 - sigma[:, None, None]) * packed + sigma[:, None, None] * noise
    return xt, sigma, ids, noise - packed
