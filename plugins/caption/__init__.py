"""Built-in plugin: the ``caption`` node and the tiny built-in captioners (``builtin:tiny-captioner`` ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fluxkiln.engine import hookimpl

from .node import caption
from .store import edited_captions_fingerprint

__all__ = ["caption", "edited_captions_fingerprint"]


@hookimpl
def register_node_types(register: Callable[[Any], None]) -> None:
    register(caption)


@hookimpl
def resolve_model(ref: str) -> str | None:
    """Local folder of a built-in tiny captioner; None for references this plugin does not own."""
    from .tiny import BUILTIN_REFS

    name = BUILTIN_REFS.get(ref.strip())
    if name is None:
        return None
    from .tiny import tiny_captioner_path

    return str(tiny_captioner_path(name))
