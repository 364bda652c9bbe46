"""The ``fluxkiln tui`` command, added through the ``register_commands`` hook like any plugin's command.

Entry point ``fluxkiln.tui`` in fluxkiln's own ``pyproject.toml``; Textual is
imported only when the command runs, so ``fluxkiln --help`` stays fast.
"""

from __future__ import annotations

import argparse

from fluxkiln.engine import CommandParsers, hookimpl


def tui_main(args: argparse.Namespace) -> int:
    """Open the terminal UI on a recipe file, a folder of recipes, or nothing."""
    from .app import run_tui

    return run_tui(args.recipe)


@hookimpl
def register_commands(subparsers: CommandParsers) -> None:
    parser = subparsers.add_parser("tui", help="open the terminal UI")
    parser.add_argument("recipe", nargs="?", help="recipe file or folder to open")
    parser.set_defaults(main=tui_main)
