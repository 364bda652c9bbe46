"""fluxkiln-example: an example third-party node plugin.

Node types: ``load_images`` (pictures from a folder or file), ``resize``
(Lanczos resize/upscale by factor or to a target size, aspect kept) and
``prompt_sweep`` (a template times lists of values gives a list of prompts).
It also adds a recipe check (``resize`` needs a size) through ``check_recipe``.

Nothing heavy is imported here: Pillow is imported when a node runs, so
``fluxkiln validate`` stays fast with this plugin installed.
"""

from typing import Any

from fluxkiln.engine import Problem, hookimpl

# Declaring a node with @node is enough: every node of this package that this module
# shows is registered, no register_node_types hook needed.
from .images import load_images, resize, resize_problems
from .sweep import prompt_sweep

__all__ = ["load_images", "prompt_sweep", "resize"]
__version__ = "0.1.0"


@hookimpl
def check_recipe(recipe: Any) -> list[Problem] | None:
    return resize_problems(recipe)
