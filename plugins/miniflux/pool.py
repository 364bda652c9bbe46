"""Training data for mini-flux's transformer phases: pools of rendered scenes, VAE-encoded once, with their
prompts tokenised once, kept on the training device.

Rendering, tokenising and VAE-encoding every batch on the fly cost more than the transformer's step; a
pool does that work in large chunks, and is refreshed chunk by chunk (oldest first) within a fixed share
of the wall clock, so the data keeps changing without slowing the steps down.
"""

from __future__ import annotations

import random
import time
from typing import Any

from .trainparts import TextEncoder, latents_of, make_batch, pick_size


class Pool:
    """Up to ``capacity`` scenes of one image size: normalised latents and both token-id tensors."""

    def __init__(self, size: tuple[int, int], capacity: int, chunk: int, vae: Any, enc: TextEncoder,
                 rng: random.Random, device: Any, two: float = 0.4) -> None:
        self.size, self.capacity, self.chunk, self.two = size, capacity, min(chunk, capacity), two
        self.vae, self.enc, self.rng, self.device = vae, enc, rng, device
        self.latents: Any = None
        self.clip_ids: Any = None
        self.t5_ids: Any = None
        self.filled = self.cursor = self.made = 0

    def fill_chunk(self) -> None:
        """Render, encode and tokenise one chunk into the pool (over the oldest entries once it is full)."""
        import torch

        n = min(self.chunk, self.capacity - self.cursor)
        batch = make_batch(self.rng, n, self.size, self.device, two=self.two)
        with torch.autocast(device_type=str(self.device).split(":")[0], dtype=torch.bfloat16,
                            enabled=str(self.device).startswith("cuda")):
            z = latents_of(self.vae, batch.images).to(torch.bfloat16)
        clip, t5 = self.enc.ids(batch.prompts)
        if self.latents is None:
            self.latents = torch.empty((self.capacity, *z.shape[1:]), dtype=z.dtype, device=self.device)
            self.clip_ids = torch.empty((self.capacity, clip.shape[1]), dtype=clip.dtype, device=self.device)
            self.t5_ids = torch.empty((self.capacity, t5.shape[1]), dtype=t5.dtype, device=self.device)
        rows = slice(self.cursor, self.cursor + n)
        self.latents[rows], self.clip_ids[rows], self.t5_ids[rows] = z, clip, t5
        self.cursor = (self.cursor + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)
        self.made += n

    def sample(self, n: int, generator: Any = None) -> tuple[Any, Any, Any]:
        """``n`` random entries: (latents float32, CLIP ids, T5 ids)."""
        import torch

        idx = torch.randint(self.filled, (n,), device=self.device, generator=generator)
        return self.latents[idx].float(), self.clip_ids[idx], self.t5_ids[idx]


class Pools:
    """The native-size pool and one small pool per 0.25 MP aspect-ratio size (none if ``multi_capacity`` is
    0); refreshes within ``share`` of the wall clock since the first fill."""

    def __init__(self, native: int, capacity: int, multi_capacity: int, chunk: int, vae: Any, enc: TextEncoder,
                 rng: random.Random, device: Any, share: float, two: float = 0.4) -> None:
        from .trainparts import SIZES_025, batch_for

        self.rng, self.share, self.native = rng, share, native
        self.pools: dict[tuple[int, int], Pool] = {(native, native): Pool((native, native), capacity, chunk, vae,
                                                                          enc, rng, device, two)}
        scale = native / 256
        for w, h in SIZES_025 if multi_capacity > 0 else ():
            size = (max(32, round(w * scale / 16) * 16), max(32, round(h * scale / 16) * 16))
            per = batch_for(size, chunk, native)
            self.pools.setdefault(size, Pool(size, max(per, multi_capacity * per // chunk), per, vae, enc, rng,
                                             device, two))
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
        return {"pool_native": native.filled, "pool_seconds": round(took, 1)}

    def refresh(self) -> None:
        """Re-render one chunk of a random pool when refreshing has used less than its share of the time."""
        if self.spent >= self.share * (time.monotonic() - self.start):
            return
        t0 = time.monotonic()
        pool = self.pools[(self.native, self.native)] if self.rng.random() < 0.85 else \
            self.rng.choice(list(self.pools.values()))
        pool.fill_chunk()
        self._sync()
        self.spent += time.monotonic() - t0

    def batch(self, base_batch: int, multi_res: float, dropout: float = 0.0) -> tuple[Any, Any, Any]:
        """A batch from one pool (the native size most of the time): latents, CLIP ids, T5 ids; a
        ``dropout`` share of the captions is replaced by the empty prompt."""
        import torch

        from .trainparts import batch_for

        size = pick_size(self.rng, self.native, multi_res)
        pool = self.pools.get(size)
        if pool is None or pool.filled == 0:
            pool = self.pools[(self.native, self.native)]
        n = batch_for(pool.size, base_batch, self.native)
        latents, clip, t5 = pool.sample(n)
        if dropout > 0:
            drop = torch.rand(n, device=latents.device) < dropout
            clip = torch.where(drop[:, None], self.empty[0], clip)
            t5 = torch.where(drop[:, None], self.empty[1], t5)
        return latents, clip, t5

    def made(self) -> int:
        return sum(p.made for p in self.pools.values())

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
