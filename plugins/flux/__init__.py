"""Built-in FLUX.1 plugin: the load_model, apply_lora and sample node types and the
``builtin:tiny-flux`` / ``builtin:tiny-flux-schnell`` model references.

Registered exactly as a third-party plugin is (``@hookimpl`` functions); nothing
heavy (torch, diffusers) is imported until a node runs.
"""

from __future__ import annotations

from fluxkiln.engine import hookimpl

from .load import load_model
from .lora import apply_lora
from .sample import recipe_problems
from .sample import sample as sample_node
from .tiny import resolve_builtin

NODE_TYPES = (load_model, apply_lora, sample_node)


@hookimpl
def register_node_types(register):
    for node_type in NODE_TYPES:
        register(node_type)


@hookimpl
def resolve_model(ref: str) -> str | None:
    return resolve_builtin(ref)


@hookimpl
def check_recipe(recipe):
    return recipe_problems(recipe)


@hookimpl
def prepare_run(recipe):
    from . import ahead, warm

    warm.start(recipe)
    ahead.start(recipe)



@hookimpl
def register_commands(subparsers):
    from .warmup import add_parser

    add_parser(subparsers)
