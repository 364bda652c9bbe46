"""Built-in plugin: image I/O nodes — ``save`` (files with embedded provenance) and ``grid`` (labelled contact sheets).

Pillow is imported only when a node runs, so loading this plugin stays fast.
"""

from collections.abc import Callable
from typing import Any

from fluxkiln.engine import hookimpl

from .grid import grid
from .save import save


@hookimpl
def register_node_types(register: Callable[[Any], None]) -> None:
    register(save)
    register(grid)
