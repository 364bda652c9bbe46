"""The hook specifications: every way a plugin extends fluxkiln.

Each hook has a typed signature and a one-line docstring; plugins implement
them with the ``hookimpl`` marker.  Built-in plugins use exactly these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .commands import CommandParsers
    from .errors import Problem
    from .events import Event
    from .ports import PortType
    from .recipe import Recipe

PROJECT = "fluxkiln"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_port_types(register: Callable[[PortType], None]) -> None:
    """Register port types (kinds of value on links) by calling ``register(PortType(...))``."""


@hookspec
def register_node_types(register: Callable[[Any], None]) -> None:
    """Register node types by calling ``register(obj)`` for each ``@node``-decorated function or class."""


@hookspec
def on_event(event: Event) -> None:
    """Observe one run or node lifecycle event; the CLI, JSON stream, TUI and loggers all use this."""


@hookspec
def check_recipe(recipe: Recipe) -> list[Problem] | None:
    """Return extra problems found in a parsed recipe, reported with the built-in validation errors."""


@hookspec
def prepare_run(recipe: Recipe) -> None:
    """A valid recipe is about to run (never on validate): start slow preparations in the background, return at once."""


@hookspec(firstresult=True)
def resolve_model(ref: str) -> str | None:
    """Turn a model reference with a custom prefix (``myhub:name``) into a local path; None if not yours."""


@hookspec
def register_commands(subparsers: CommandParsers, register: Callable[[str, str, Callable[[list[str]], int]], None]) -> None:
    """Add CLI subcommands: ``subparsers.add_parser(name, help=...)`` (argparse) or ``register(name, help, main)``."""
