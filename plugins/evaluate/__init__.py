"""Built-in plugin: the ``evaluate`` node (prompt adherence of images, by mini-flux's pixel checker or by
CLIP score) and the tiny built-in CLIP model ``builtin:tiny-clip`` used to test it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fluxkiln.engine import hookimpl

from .node import evaluate

__all__ = ["evaluate"]


@hookimpl
def register_node_types(register: Callable[[Any], None]) -> None:
    register(evaluate)


@hookimpl
def resolve_model(ref: str) -> str | None:
    from .tinyclip import resolve_builtin

    return resolve_builtin(ref)
