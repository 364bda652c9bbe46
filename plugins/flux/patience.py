"""When compiling the VAE decoder pays: eager decodes until it does, then the compiled decoder.

A compiled decoder saves about 0.05 s per 1024² image (H100: 0.090 s eager, 0.038 s compiled) but costs 20-24 s
of code generation the first time a size is compiled on a machine, and a second or two of tracing in every later
process.  A one-shot ``fluxkiln run`` of a few images never earns that back, and it was most of the cold first
image (40.8 s on an H200).  So by default (``FLUXKILN_COMPILE_VAE`` unset) a decoder call of a given latent shape
uses the compiled decoder when

* it was saved precompiled (by ``fluxkiln warmup``, or by a run that compiled it: no compilation at all in this
  process), or
* this machine compiled that shape before (a marker file beside the precompiled ones: the compile cache has it), or
* this process has already decoded :data:`PATIENCE` images of that shape eagerly (a long session: a sweep, a
  watch loop, the TUI), or
* ``fluxkiln warmup`` is recording (it is there to pay compilation ahead of time);

and the eager decoder otherwise.  ``FLUXKILN_COMPILE_VAE=1`` compiles from the first decode (the bench's
steady-state rows use it), ``=0`` never compiles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

PATIENCE = 8  # eager decodes of one shape in a process before it compiles that shape


def patience() -> int | None:
    """Eager decodes of a shape before compiling it: 0 with ``FLUXKILN_COMPILE_VAE=1`` (compile at once), else
    :data:`PATIENCE`; None with ``=0`` (never compile: the caller keeps the decoder eager)."""
    value = os.environ.get("FLUXKILN_COMPILE_VAE", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return None
    if value in ("1", "true", "yes", "on", "always"):
        return 0
    return PATIENCE


class Patience:
    """A decoder's call: ``compiled`` for shapes where compiling pays (see the module), ``eager`` otherwise."""

    def __init__(self, module: Any, compiled: Callable[..., Any], eager: Callable[..., Any], wait: int,
                 markers: Path) -> None:
        self.module, self.compiled, self.eager, self.wait, self.markers = module, compiled, eager, wait, markers
        self.ready: set[tuple[Any, ...]] = set()
        self.eager_calls: dict[tuple[Any, ...], int] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from . import precompiled, variantkeys

        sig = variantkeys.call_signature(args, kwargs)
        if sig is None or sig in self.ready:
            return self.compiled(*args, **kwargs)
        key = variantkeys.variant_key(self.module, sig)
        marker = self.markers / f"{key}.compiled"
        n = self.eager_calls.get(sig, 0)
        if n >= self.wait or marker.exists() or precompiled.recording() or self._precompiled(key):
            out = self.compiled(*args, **kwargs)
            self.ready.add(sig)
            self._mark(marker)
            return out
        self.eager_calls[sig] = n + 1
        return self.eager(*args, **kwargs)

    def _precompiled(self, key: str) -> bool:
        return key in getattr(self.compiled, "variants", {})

    def _mark(self, marker: Path) -> None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # a read-only cache: the next process waits again, nothing worse
