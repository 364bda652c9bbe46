"""Aspect-ratio buckets that never upscale, and the seeded order in which batches are drawn.

Every image is used once per training resolution: it is scaled down (never up)
so its area is at most ``resolution²``, then centre-cropped to sides that are
multiples of 64 (16 for small sizes), keeping its aspect ratio.  Images of the
same bucket size can share a batch.  The order of each epoch depends only on
the seed and the epoch number, so a run resumed at (epoch, position) draws
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_SIDE = 16


@dataclass(frozen=True)
class Sample:
    """One training example: an image of the dataset at one bucket size."""

    item: int
    width: int
    height: int


def bucket_size(img_w: int, img_h: int, resolution: int) -> tuple[int, int]:
    """The bucket (width, height) for an image at a training resolution; never larger than the image."""
    if img_w < MIN_SIDE or img_h < MIN_SIDE:
        raise ValueError(f"image is {img_w}x{img_h}; training needs at least {MIN_SIDE}x{MIN_SIDE}")
    scale = min(1.0, resolution / math.sqrt(img_w * img_h))
    tw, th = img_w * scale, img_h * scale
    step = 64 if min(tw, th) >= 256 else MIN_SIDE
    w = max(MIN_SIDE, int(tw // step) * step)
    h = max(MIN_SIDE, int(th // step) * step)
    return min(w, img_w // MIN_SIDE * MIN_SIDE), min(h, img_h // MIN_SIDE * MIN_SIDE)


def build_samples(sizes: list[tuple[int, int]], resolutions: list[int]) -> list[Sample]:
    """Every (image, bucket) pair, each once (small images collapse across resolutions)."""
    seen: set[Sample] = set()
    out: list[Sample] = []
    for i, (w, h) in enumerate(sizes):
        for r in sorted(set(resolutions)):
            bw, bh = bucket_size(w, h, r)
            s = Sample(i, bw, bh)
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out


def epoch_batches(samples: list[Sample], batch_size: int, seed: int, epoch: int) -> list[list[Sample]]:
    """The batches of one epoch: shuffled within each bucket, chunked, then the chunks shuffled."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    by_bucket: dict[tuple[int, int], list[Sample]] = {}
    for s in samples:
        by_bucket.setdefault((s.width, s.height), []).append(s)
    batches: list[list[Sample]] = []
    for key in sorted(by_bucket):
        group = by_bucket[key]
        perm = torch.randperm(len(group), generator=g).tolist()
        shuffled = [group[i] for i in perm]
        batches += [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


class BatchCursor:
    """Where the data order stands: (epoch, index of the next batch in that epoch)."""

    def __init__(self, samples: list[Sample], batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.epoch, self.index = epoch, index
        self._batches = epoch_batches(samples, batch_size, seed, epoch)

    def next(self) -> list[Sample]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = epoch_batches(self.samples, self.batch_size, self.seed, self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}
