"""Training data for mini-flux's transformer phases: pools of rendered scenes, VAE-encoded once, with their
prompts tokenised once, kept on the training device.

Rendering, tokenising and VAE-encoding every batch on the fly cost more than the transformer's step; a
pool does that work in large chunks, and is refreshed chunk by chunk (oldest first) within a fixed share
of the wall clock, so the data keeps changing without slowing the steps down.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from dataclasses import dataclass

from .roles import IGNORE, scene_labels, token_labels
from .trainparts import TextEncoder, latents_of, make_batch, pick_size
from .world import SHAPES

COVER_PATCH = 16  # pixels per side of one packed latent token (VAE /8, then 2x2 packing)


@dataclass
class Draw:
    """A training batch from a pool."""

    latents: Any  # (B, C, h, w) normalised latents, float32
    clip: Any  # (B, CLIP_TOKENS) ids
    t5: Any  # (B, TEXT_TOKENS) ids
    t5_labels: Any  # (B, TEXT_TOKENS, 5) role labels of the T5 tokens (see .roles)
    pooled_labels: Any  # (B, 4) labels of the prompt for CLIP's pooled vector
    cover: Any  # (B, h/2 * w/2) object coverage of each packed latent token, in [0, 1]


class Pool:
    """Up to ``capacity`` scenes of one image size: normalised latents, both token-id tensors, the role labels
    and each latent token's object coverage."""

    def __init__(self, size: tuple[int, int], capacity: int, chunk: int, vae: Any, enc: TextEncoder,
                 rng: random.Random, device: Any, two: float = 0.4, pairs: float = 0.0,
                 shapes: tuple[str, ...] = SHAPES) -> None:
        self.shapes = shapes
        self.size, self.capacity, self.chunk, self.two = size, capacity, min(chunk, capacity), two
        # role-swapped pairs sit at rows (2i, 2i + 1) and are drawn together, when every chunk keeps them aligned
        self.pairs = pairs if self.chunk % 2 == 0 and capacity % 2 == 0 else 0.0
        self.vae, self.enc, self.rng, self.device = vae, enc, rng, device
        self.tensors: dict[str, Any] = {}
        self.filled = self.cursor = self.made = 0
        self.shapes_drawn: Counter[str] = Counter()  # objects of each shape in every chunk rendered so far

    def fill_chunk(self) -> None:
        """Render, encode and tokenise one chunk into the pool (over the oldest entries once it is full)."""
        import torch

        import torch.nn.functional as F

        n = min(self.chunk, self.capacity - self.cursor)
        batch = make_batch(self.rng, n, self.size, self.device, two=self.two, masks=True, pairs=self.pairs,
                           shapes=self.shapes)
        with torch.autocast(device_type=str(self.device).split(":")[0], dtype=torch.bfloat16,
                            enabled=str(self.device).startswith("cuda")):
            z = latents_of(self.vae, batch.images).to(torch.bfloat16)
        clip, t5 = self.enc.ids(batch.prompts)
        scenes = batch.scenes or []
        self.shapes_drawn.update(o.shape for scene in scenes for o in scene.objects)
        rows = {"latents": z, "clip": clip, "t5": t5,
                "t5_labels": token_labels(scenes, self.enc.t5_tok).to(self.device),
                "pooled_labels": scene_labels(scenes).to(self.device),
                "cover": F.avg_pool2d(batch.cover[:, None], COVER_PATCH).flatten(1).to(torch.bfloat16)}
        if not self.tensors:
            self.tensors = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=self.device)
                            for k, v in rows.items()}
        at = slice(self.cursor, self.cursor + n)
        for k, v in rows.items():
            self.tensors[k][at] = v
        self.cursor = (self.cursor + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)
        self.made += n

    def sample(self, n: int, generator: Any = None) -> Draw:
        """``n`` random entries."""
        import torch

        if self.pairs > 0:
            first = 2 * torch.randint(self.filled // 2, ((n + 1) // 2,), device=self.device, generator=generator)
            idx = torch.stack([first, first + 1], dim=1).flatten()[:n]
        else:
            idx = torch.randint(self.filled, (n,), device=self.device, generator=generator)
        t = {k: v[idx] for k, v in self.tensors.items()}
        return Draw(t["latents"].float(), t["clip"], t["t5"], t["t5_labels"], t["pooled_labels"], t["cover"].float())


class Pools:
    """The native-size pool and one small pool per 0.25 MP aspect-ratio size (none if ``multi_capacity`` is
    0); refreshes within ``share`` of the wall clock since the first fill."""

    def __init__(self, native: int, capacity: int, multi_capacity: int, chunk: int, vae: Any, enc: TextEncoder,
                 rng: random.Random, device: Any, share: float, two: float = 0.4, pairs: float = 0.0,
                 shapes: tuple[str, ...] = SHAPES) -> None:
        from .trainparts import SIZES_025, batch_for

        self.rng, self.share, self.native = rng, share, native
        self.pools: dict[tuple[int, int], Pool] = {(native, native): Pool((native, native), capacity, chunk, vae,
                                                                          enc, rng, device, two, pairs, shapes)}
        scale = native / 256
        for w, h in SIZES_025 if multi_capacity > 0 else ():
            size = (max(32, round(w * scale / 16) * 16), max(32, round(h * scale / 16) * 16))
            per = batch_for(size, chunk, native)
            self.pools.setdefault(size, Pool(size, max(per, multi_capacity * per // chunk), per, vae, enc, rng,
                                             device, two, shapes=shapes))
        self.start, self.spent = time.monotonic(), 0.0
        empty_clip, empty_t5 = enc.ids([""])
        self.empty = (empty_clip, empty_t5)

    def fill(self, seconds: float, log: Any = print) -> dict[str, Any]:
        """The first fill: every multi-resolution pool once, then the native pool until full or ``seconds``."""
        t0 = time.monotonic()
        others = [p for size, p in self.pools.items() if size != (self.native, self.native)]
        for pool in others:  # one chunk each, then round after round while a quarter of the time lasts
            pool.fill_chunk()
        while any(p.filled < p.capacity for p in others) and time.monotonic() - t0 < seconds / 4:
            for pool in others:
                if pool.filled < pool.capacity:
                    pool.fill_chunk()
        native = self.pools[(self.native, self.native)]
        while native.filled < native.capacity and (time.monotonic() - t0 < seconds or native.filled == 0):
            native.fill_chunk()
        self._sync()
        took = time.monotonic() - t0
        self.start, self.spent = time.monotonic(), 0.0  # refreshing's share counts from here
        log(f"pools filled in {took:.1f} s: native {native.filled}, "
            f"others {sum(p.filled for s, p in self.pools.items() if p is not native)}")
        drawn = sum((p.shapes_drawn for p in self.pools.values()), Counter())
        total = sum(drawn.values()) or 1
        return {"pool_native": native.filled, "pool_seconds": round(took, 1),
                "pool_shapes": {shape: round(100 * n / total, 1) for shape, n in sorted(drawn.items())}}

    def due(self) -> bool:
        """Whether refreshing has used less than its share of the time so far."""
        return self.spent < self.share * (time.monotonic() - self.start)

    def refresh(self, decide: Any = None) -> None:
        """Re-render one chunk of a random pool when refreshing has used less than its share of the time.
        ``decide`` (the local verdict -> the verdict to follow) lets several ranks refresh at the same step,
        so that none waits for another's refresh in the next all-reduce."""
        due = self.due()
        if not (decide(due) if decide else due):
            return
        t0 = time.monotonic()
        pool = self.pools[(self.native, self.native)] if self.rng.random() < 0.85 else \
            self.rng.choice(list(self.pools.values()))
        pool.fill_chunk()
        self._sync()
        self.spent += time.monotonic() - t0

    def batch(self, base_batch: int, multi_res: float, dropout: float = 0.0) -> Draw:
        """A batch from one pool (the native size most of the time); a ``dropout`` share of the captions is
        replaced by the empty prompt (and loses its role labels)."""
        import torch

        from .trainparts import batch_for

        size = pick_size(self.rng, self.native, multi_res)
        pool = self.pools.get(size)
        if pool is None or pool.filled == 0:
            pool = self.pools[(self.native, self.native)]
        n = batch_for(pool.size, base_batch, self.native)
        d = pool.sample(n)
        if dropout > 0:
            drop = torch.rand(n, device=d.latents.device) < dropout
            d.clip = torch.where(drop[:, None], self.empty[0], d.clip)
            d.t5 = torch.where(drop[:, None], self.empty[1], d.t5)
            d.t5_labels = torch.where(drop[:, None, None], IGNORE, d.t5_labels)
            d.pooled_labels = torch.where(drop[:, None], IGNORE, d.pooled_labels)
        return d

    def made(self) -> int:
        return sum(p.made for p in self.pools.values())

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
