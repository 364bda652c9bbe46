"""Describe a failed node for the user: node, type, plugin, inputs, error and what to try."""

from __future__ import annotations

import traceback
from typing import Any

from .errors import NodeError


def summarize_inputs(inputs: dict[str, Any]) -> dict[str, str]:
    """A short description of each input value (never the value itself)."""
    out = {}
    for key, value in inputs.items():
        desc = type(value).__name__
        if hasattr(value, "__len__") and not isinstance(value, str):
            try:
                desc += f"[{len(value)}]"
            except TypeError:
                pass
        ref = getattr(value, "ref", None)
        if ref:
            desc += f" {ref}"
        out[key] = desc
    return out


def _hint_for(exc: BaseException) -> str | None:
    text = f"{type(exc).__name__}: {exc}".lower()
    if "out of memory" in text or "outofmemory" in text:
        return ("the GPU ran out of memory: try gradient_checkpointing = true, a lower resolution, "
                "quantize = \"fp8\", offload = \"model\", a smaller batch_size / lora_rank or num_outputs")
    if isinstance(exc, FileNotFoundError):
        return "check the path; paths in a recipe are relative to the recipe file"
    if isinstance(exc, ImportError):
        return f"install the missing package: pip install {getattr(exc, 'name', None) or '...'}"
    return None


def describe_failure(node: str, nt: Any, exc: BaseException, inputs: dict[str, Any],
                     recipe: Any = None) -> dict[str, Any]:
    """The data of a ``node_failed`` event; a ``NodeError(key=...)`` is located at that key's recipe line."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else None
    hint = exc.hint if isinstance(exc, NodeError) and exc.hint else _hint_for(exc)
    info: dict[str, Any] = {
        "error": str(exc) or type(exc).__name__,
        "error_type": type(exc).__name__,
        "hint": hint,
        "plugin": nt.plugin,
        "inputs": summarize_inputs(inputs),
    }
    if isinstance(exc, NodeError) and exc.key:
        info["key"] = exc.key
        if recipe is not None:
            located = recipe.problem(info["error"], node=node, key=exc.key)
            info["file"], info["line"] = located.file, located.line
    if not isinstance(exc, NodeError):
        info["where"] = where
        info["traceback"] = "".join(traceback.format_exception(exc)[-6:])
    return info
