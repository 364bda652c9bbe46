"""A text-to-image batch's starting noise, drawn in a background thread while the CPU does the call's other work.

``sample`` seeds a CPU ``torch.Generator`` per image (so a seed makes the same picture on any device), and
drawing 1024² latents from it takes milliseconds of CPU time — on a GPU machine about 8 ms per image, during
which the GPU waits for its first step.  :func:`noise_ahead` starts the pipeline's own ``prepare_latents`` in a
thread (torch releases the GIL while it draws) as soon as a batch begins, and, for the length of the pipeline
call, makes the pipeline's ``prepare_latents`` take that result when it asks for exactly what was drawn: the
same batch, channels, size, dtype, device and generators.  Anything else (or a failure in the thread) draws
afresh from the generators re-seeded, so the images are the same as without it, bit for bit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class _Drawn:
    """The thread drawing one batch's packed latents, and what it was asked for; served at most once."""

    def __init__(self, pipe: Any, args: tuple[Any, ...], generators: list[Any], seeds: list[int]) -> None:
        self.args, self.generators, self.seeds = args, generators, seeds
        self.value: Any = None
        self.error: BaseException | None = None
        self.served = False
        self.thread = threading.Thread(target=self._draw, args=(pipe,), name="fluxkiln-noise", daemon=True)
        self.thread.start()

    def _draw(self, pipe: Any) -> None:
        try:
            self.value = type(pipe).prepare_latents(pipe, *self.args, self.generators)[0]
        except Exception as exc:  # noqa: BLE001 - any failure: the call draws the noise itself
            self.error = exc

    def take(self, args: tuple[Any, ...], generators: Any) -> Any:
        """The drawn latents if ``args`` and ``generators`` are what was drawn for (once), else None with the
        generators re-seeded, as if nothing had been drawn."""
        self.thread.join()
        if not self.served and self.error is None and generators is self.generators and _same(args, self.args):
            self.served = True
            return self.value
        self.reseed()
        return None

    def reseed(self) -> None:
        self.thread.join()
        if not self.served:
            for g, seed in zip(self.generators, self.seeds, strict=True):
                g.manual_seed(seed)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(type(x) is type(y) and x == y for x, y in zip(a, b, strict=True))


@contextlib.contextmanager
def noise_ahead(pipe: Any, size: tuple[int, int], generators: list[Any], seeds: list[int]) -> Iterator[None]:
    """While the block runs, ``pipe.prepare_latents`` serves the noise a thread started drawing on entry, for one
    image of ``size`` (width, height) per generator (``generators``, seeded with ``seeds``).  Only for a plain
    FLUX text-to-image pipeline whose modules sit on one device without offload; otherwise nothing changes."""
    args = _plan(pipe, size, len(generators))
    if args is None:
        yield
        return
    drawn = _Drawn(pipe, args, generators, seeds)
    original = type(pipe).prepare_latents

    def prepare_latents(*call: Any, **kw: Any) -> Any:  # an instance attribute: called without self
        drawing = ((len(call) == 7 and set(kw) <= {"latents"} and kw.get("latents") is None)
                   or (len(call) == 8 and call[7] is None and not kw))  # no latents given: the pipeline draws
        if drawing:
            served = drawn.take(call[:6], call[6])
            if served is not None:
                return original(pipe, *call[:7], served)
        else:
            drawn.reseed()
        return original(pipe, *call, **kw)

    pipe.prepare_latents = prepare_latents
    try:
        yield
    finally:
        pipe.__dict__.pop("prepare_latents", None)
        drawn.thread.join()


def _plan(pipe: Any, size: tuple[int, int], batch: int) -> tuple[Any, ...] | None:
    """``prepare_latents``' arguments before the generators, as the pipeline will pass them, or None where this
    pipeline is not one whose call can be foreseen."""
    from diffusers import FluxPipeline

    if type(pipe) is not FluxPipeline or "prepare_latents" in pipe.__dict__:
        return None
    if getattr(pipe, "_fluxkiln_offload", "none") != "none" or getattr(pipe, "text_encoder_2", None) is None:
        return None
    try:
        device = next(pipe.transformer.parameters()).device
    except StopIteration:
        return None
    channels = pipe.transformer.config.in_channels // 4
    w, h = size
    return (batch, channels, h, w, pipe.text_encoder_2.dtype, device)
