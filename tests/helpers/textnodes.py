"""A tiny test plugin: text nodes that exercise the engine without any model."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import Field

from fluxkiln.engine import FilePath, NodeError, RunContext, Text, hookimpl, node

CALLS: list[str] = []


@node("const", version="1")
def const(ctx: RunContext, value: Annotated[str, Field(description="the text")] = "x",
          repeat: Annotated[int, Field(ge=1, le=10, description="times")] = 1,
          scale: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5,
          mode: Literal["a", "b"] = "a") -> Text:
    """Produce a constant text."""
    CALLS.append(ctx.node)
    return Text(value * repeat)


@node("concat", version="1")
def concat(ctx: RunContext, left: Text, right: Text | None = None, sep: str = "+") -> Text:
    """Join two texts."""
    CALLS.append(ctx.node)
    path = ctx.node_dir() / "out.txt"
    out = left + (sep + right if right is not None else "")
    path.write_text(out)
    ctx.artifact(path)
    return Text(out)


@node("read_file", version="1")
def read_file(ctx: RunContext, path: FilePath) -> Text:
    """Read a text file."""
    CALLS.append(ctx.node)
    with open(path) as f:
        return Text(f.read())


@node("boom", version="1")
def boom(ctx: RunContext, text: Text, message: str = "kaput") -> Text:
    """Always fails."""
    CALLS.append(ctx.node)
    raise NodeError(message, hint="try again")


@node("slow", version="1", cache="never")
def slow(ctx: RunContext, text: Text, steps: int = 50, delay: float = 0.05) -> Text:
    """Counts slowly, checking for cancellation."""
    CALLS.append(ctx.node)
    for i in range(steps):
        ctx.check_cancelled()
        time.sleep(delay)
        ctx.progress(i + 1, steps, metrics={"loss": 1.0 / (i + 1)})
    return Text(text)


@hookimpl
def register_node_types(register):
    for n in (const, concat, read_file, boom, slow):
        register(n)
