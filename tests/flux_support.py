"""Helpers shared by the flux plugin tests: write a recipe, run it, read a node's failure or an image's pixels."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest


def pixels(item) -> np.ndarray:
    """An output image item's RGB pixels as float32."""
    return np.asarray(item.image.convert("RGB")).astype(np.float32)


def recipe(folder: Path, body: str, name: str = "t") -> Path:
    """Write ``[recipe] name`` plus ``body`` (dedented) to ``folder/<name>.toml``."""
    path = folder / f"{name}.toml"
    path.write_text(f'[recipe]\nname = "{name}"\n\n' + textwrap.dedent(body))
    return path


def run(engine, path: Path, expect: str | None = "ok", **kw):
    """Run a recipe into ``runs/<name>/`` beside it; fail the test unless the status is ``expect``."""
    result = engine.run(path, output=path.parent / "runs" / path.stem, **kw)
    if expect and result.status != expect:
        errors = [f"{e.node}: {e.data.get('error')}\n{e.data.get('traceback', '')}" for e in result.events
                  if e.event == "node_failed"]
        pytest.fail(f"status {result.status}, expected {expect}: {errors}")
    return result


def run_body(engine, folder: Path, body: str, name: str = "t", expect: str | None = "ok"):
    """Write and run a recipe in one step."""
    return run(engine, recipe(folder, body, name), expect)


def failure(result, node: str) -> dict:
    """The data of ``node``'s last node_failed event (the test fails if it did not fail)."""
    found = [e.data for e in result.events if e.event == "node_failed" and e.node == node]
    assert found, f"node {node} did not fail: {result.nodes}"
    return found[-1]
