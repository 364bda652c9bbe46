"""CLI subcommands added by plugins through the ``register_commands`` hook.

A plugin adds a command in one of two ways:

* ``subparsers.add_parser(name, help=...)`` returns an ``argparse.ArgumentParser``
  (prog ``fluxkiln NAME``) the plugin fills with arguments; it names its
  handler with ``parser.set_defaults(main=fn)`` and ``fn(args)`` gets the parsed
  ``argparse.Namespace`` and returns the exit code;
* ``register(name, help, main)`` (the older form): ``main(argv)`` gets the raw
  argument list.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import PluginError

BUILTIN_COMMANDS = ("run", "watch", "validate", "graph", "nodes", "plugins", "cache", "inspect", "new-plugin")


@dataclass
class Command:
    """One plugin command: ``parser`` is set for argparse commands, else ``main`` takes raw argv."""

    name: str
    help: str
    plugin: str
    main: Callable[..., int]
    parser: argparse.ArgumentParser | None = None

    def __call__(self, argv: list[str]) -> int:
        """Run the command with the arguments after its name; return its exit code."""
        if self.parser is None:
            return self.main(argv)
        args = self.parser.parse_args(argv)
        return args.main(args)


class CommandParsers:
    """What ``register_commands`` receives as ``subparsers``: works like argparse's ``add_subparsers()``.

    ``add_parser(name, help=..., **kwargs)`` returns an ``argparse.ArgumentParser``
    (``kwargs`` are ``ArgumentParser`` options such as ``description`` or
    ``epilog``); set its handler with ``parser.set_defaults(main=fn)``.
    """

    def __init__(self, plugin: str, taken: Callable[[str], str | None]) -> None:
        self.plugin = plugin
        self._taken = taken
        self.parsers: dict[str, tuple[str, argparse.ArgumentParser]] = {}

    def add_parser(self, name: str, *, help: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
        check_name(name, self.plugin, self._taken)
        if name in self.parsers:
            raise PluginError(f"plugin '{self.plugin}': command '{name}' is registered twice")
        kwargs.setdefault("description", help)
        parser = argparse.ArgumentParser(prog=f"fluxkiln {name}", **kwargs)
        self.parsers[name] = (help or "", parser)
        return parser

    def commands(self) -> list[Command]:
        """The commands added so far; each parser must name its handler with ``set_defaults(main=fn)``."""
        out = []
        for name, (help_text, parser) in self.parsers.items():
            main = parser.get_default("main")
            if not callable(main):
                raise PluginError(f"plugin '{self.plugin}': command '{name}' has no handler; call "
                                  "parser.set_defaults(main=fn) where fn(args) returns the exit code")
            out.append(Command(name, help_text, self.plugin, main, parser))
        return out


def check_name(name: Any, plugin: str, taken: Callable[[str], str | None]) -> None:
    """Refuse a command name that is not a plain word or that fluxkiln or another plugin already uses."""
    if not isinstance(name, str) or not name or name.startswith("-") or any(c.isspace() for c in name):
        raise PluginError(f"plugin '{plugin}': command name {name!r} must be a word such as 'palettes'")
    owner = "fluxkiln" if name in BUILTIN_COMMANDS else taken(name)
    if owner:
        raise PluginError(f"plugin '{plugin}': command '{name}' is already provided by '{owner}'")


def raw_command(plugin: str, taken: Callable[[str], str | None], name: Any, help: Any, main: Any) -> Command:
    """A command registered the older way, ``register(name, help, main)`` with ``main(argv) -> int``."""
    check_name(name, plugin, taken)
    if not callable(main):
        raise PluginError(f"plugin '{plugin}': command '{name}' needs a callable main(argv) -> int")
    return Command(name, str(help or ""), plugin, main)
