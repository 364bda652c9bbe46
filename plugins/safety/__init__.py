"""Built-in plugin: the ``safety_check`` node and the tiny built-in safety models (``builtin:tiny-safety``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fluxkiln.engine import hookimpl

from .node import safety_check

__all__ = ["safety_check"]


@hookimpl
def register_node_types(register: Callable[[Any], None]) -> None:
    register(safety_check)


@hookimpl
def resolve_model(ref: str) -> str | None:
    """Local folder of a built-in tiny safety model; None for references this plugin does not own."""
    from .tiny import BUILTIN_REFS

    if ref.strip() not in BUILTIN_REFS:
        return None
    from .tiny import tiny_safety_path

    return str(tiny_safety_path(ref.strip()))
