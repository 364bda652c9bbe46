"""Built-in plugin: mini-flux, a small FLUX.1 model trained by fluxkiln on a synthetic world of flat shapes
(``builtin:mini-flux``, ``builtin:mini-flux-schnell``), with its world, renderer, pixel checker, training
and adherence scripts.  Nothing heavy is imported until a model is used.
"""

from __future__ import annotations

from fluxkiln.engine import hookimpl


@hookimpl
def resolve_model(ref: str) -> str | None:
    from .weights import resolve_builtin

    return resolve_builtin(ref)
