"""The plugin manager: load plugins and hold the node types, port types and commands they register.

Every plugin is found the same way: fluxkiln's own (node plugins and the TUI)
through the entry points in group ``fluxkiln`` that its own ``pyproject.toml``
declares, installed third-party plugins through theirs.  Built-ins load first,
so a third party can never replace them.  A plugin that fails in any way (to
import, to register, a name clash) contributes nothing: none of its node types,
port types, commands or other hooks are used, and ``fluxkiln plugins`` shows
why.  ``FLUXKILN_PLUGINS`` (comma-separated entry point or distribution names)
limits which third-party plugins load; ``FLUXKILN_PLUGIN_MODULES``
(comma-separated importable module names) loads plugins that are not
installed, for developing a plugin without packaging it.

Public surface (also for tests): ``node_types``, ``port_types``, ``plugins``,
``commands``, ``plugin_of()``, ``failed_plugins()``, ``emit()``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .commands import BUILTIN_COMMANDS, Command, CommandParsers, raw_command
from .errors import PluginError
from .events import Event
from .nodes import NodeType, build_node_type
from .plugin_errors import PLUGIN_FAILURES, entry_point_error, short_error
from .ports import ALIASES, PortType, by_annotation, list_name, with_lists

__all__ = ["BUILTIN_COMMANDS", "PluginInfo", "Registry"]

ENTRY_POINT_GROUP = "fluxkiln"
DISTRIBUTION = "fluxkiln"
ENV_ALLOW = "FLUXKILN_PLUGINS"
ENV_MODULES = "FLUXKILN_PLUGIN_MODULES"
NOT_INSTALLED = ("fluxkiln's built-in plugins are not registered: no entry point in group 'fluxkiln' comes from "
                 "the fluxkiln distribution; reinstall fluxkiln (pip install -e . in a checkout, else "
                 "pip install --force-reinstall fluxkiln)")


@dataclass
class PluginInfo:
    """What ``fluxkiln plugins`` shows about one plugin."""

    name: str
    module: str
    source: str  # "builtin", "entry point", "module" or "extra"
    version: str | None = None
    distribution: str | None = None
    load_time: float = 0.0
    error: str | None = None
    node_types: list[str] = field(default_factory=list)
    port_types: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.error = f"{self.error}; {message}" if self.error else message


class Registry:
    """Loaded plugins, node types, port types and commands; delivers events to observers."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.node_types: dict[str, NodeType] = {}
        self.port_types: dict[str, PortType] = {}
        self.duplicates: dict[str, list[str]] = {}
        self.commands: dict[str, Command] = {}
        self._objects: dict[str, Any] = {}  # plugin name -> module or object
        self._lost_ports: dict[str, str] = {}  # port type -> the failed plugin that had registered it

    # ------------------------------------------------------------ loading
    @classmethod
    def load(cls, extra: list[Any] | None = None, *, entry_points: bool = True, builtins: bool = True) -> Registry:
        """Load built-in plugins, installed plugins and ``extra`` plugin objects or modules."""
        reg = cls()
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        if builtins:
            own = [ep for ep in eps if _dist_name(ep) == DISTRIBUTION]
            for ep in own:
                reg._add_entry_point(ep, "builtin")
            if not own:
                reg.plugins[DISTRIBUTION] = PluginInfo(DISTRIBUTION, DISTRIBUTION, "builtin", error=NOT_INSTALLED)
        if entry_points:
            allow = {a.strip().lower() for a in os.environ.get(ENV_ALLOW, "").split(",") if a.strip()}
            for ep in eps:
                dist = _dist_name(ep)
                if dist == DISTRIBUTION or (allow and ep.name.lower() not in allow and (dist or "").lower() not in allow):
                    continue
                reg._add_entry_point(ep, "entry point")
        for modname in filter(None, (m.strip() for m in os.environ.get(ENV_MODULES, "").split(","))):
            if modname not in reg.plugins:
                reg._add_module(modname)
        for i, obj in enumerate(extra or []):
            reg._add_object(obj, getattr(obj, "__name__", None) or f"extra-{i}", "extra")
        reg._register_all()
        return reg

    def _add_entry_point(self, ep: Any, source: str) -> None:
        if ep.name in self.plugins:
            return
        dist = _dist_name(ep)
        info = PluginInfo(name=ep.name, module=ep.value, source=source, distribution=dist,
                          version=ep.dist.version if ep.dist else None)
        self._timed(info, lambda: ep.load(), lambda exc: entry_point_error(exc, ep, dist))

    def _add_module(self, modname: str) -> None:
        info = PluginInfo(name=modname, module=modname, source="module")
        self._timed(info, lambda: importlib.import_module(modname), short_error)

    def _timed(self, info: PluginInfo, load: Callable[[], Any], describe: Callable[[BaseException], str]) -> None:
        self.plugins[info.name] = info
        t0 = time.perf_counter()
        try:
            self._register_object(load(), info.name)
        except PLUGIN_FAILURES as exc:  # a broken plugin must not break the others, nor end fluxkiln
            info.fail(describe(exc))
        info.load_time = time.perf_counter() - t0

    def _add_object(self, obj: Any, name: str, source: str) -> None:
        if self.pm.is_registered(obj):  # the same module given twice (a marker and plugins=[...])
            return
        info = PluginInfo(name=name, module=getattr(obj, "__module__", None) or name, source=source)
        if isinstance(obj, types.ModuleType):
            info.module = obj.__name__
        if name in self.plugins:
            self.plugins.setdefault(f"{name} (2)", info).fail(
                f"plugin name '{name}' is already used by another plugin; give the object another __name__")
            return
        self.plugins[name] = info
        try:
            self._register_object(obj, name)
        except PLUGIN_FAILURES as exc:
            info.fail(short_error(exc))

    def _register_object(self, obj: Any, name: str) -> None:
        self.pm.register(obj, name=name)
        self._objects[name] = obj

    # ------------------------------------------------------------ registration
    def _hook(self, hook_name: str, plugin: str) -> Any | None:
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        return next((impl for impl in impls if impl.plugin_name == plugin), None)

    def _loaded(self) -> list[str]:
        """Plugins that imported, in load order: built-ins first, so they can never be overridden."""
        return [name for name, info in self.plugins.items() if not info.error and name in self._objects]

    def _register_all(self) -> None:
        for plugin in self._loaded():
            self._stage(plugin, "register_port_types", self._ports_of)
        self.port_types = with_lists(self.port_types)  # list[X] for every port type X
        ports_by_cls = by_annotation(self.port_types)
        for plugin in self._loaded():
            self._stage(plugin, "register_node_types", lambda p, impl: self._nodes_of(p, impl, ports_by_cls))
        for plugin in self._loaded():
            self._stage(plugin, "register_commands", self._commands_of)
        self._drop_orphans()

    def _stage(self, plugin: str, hook_name: str, collect: Callable[[str, Any], None]) -> None:
        """Collect one plugin's registrations; any error fails the whole plugin (nothing of it stays)."""
        impl = self._hook(hook_name, plugin)
        if impl is None and hook_name != "register_node_types":
            return
        t0 = time.perf_counter()
        try:
            collect(plugin, impl)
        except PluginError as exc:
            self._fail(plugin, str(exc))
        except PLUGIN_FAILURES as exc:
            self._fail(plugin, short_error(exc))
        self.plugins[plugin].load_time += time.perf_counter() - t0

    def _ports_of(self, plugin: str, impl: Any) -> None:
        staged: list[PortType] = []
        impl.function(register=staged.append)
        _all_or_nothing([lambda pt=pt: self._check_port(pt, plugin, staged) for pt in staged])
        for pt in staged:
            self.port_types[pt.name] = pt
            self.plugins[plugin].port_types.append(pt.name)

    def _check_port(self, pt: Any, plugin: str, staged: list[Any]) -> None:
        if not isinstance(pt, PortType):
            raise PluginError(f"plugin '{plugin}': register_port_types must register PortType values, got {pt!r}")
        if "[" in pt.name or pt.name in ALIASES:
            raise PluginError(f"plugin '{plugin}': port type name '{pt.name}' is reserved; list[X] port types are "
                              "derived from every port type X by the engine")
        if pt.name in self.port_types or sum(p.name == pt.name for p in staged) > 1:
            owner = next((n for n, i in self.plugins.items() if pt.name in i.port_types), plugin)
            raise PluginError(f"plugin '{plugin}': port type '{pt.name}' is already registered by plugin '{owner}'")

    def _nodes_of(self, plugin: str, impl: Any, ports_by_cls: dict[type, PortType]) -> None:
        objs: list[Any] = []
        if impl is not None:
            impl.function(register=objs.append)
        objs += _declared_nodes(self._objects[plugin])
        staged: dict[str, NodeType] = {}
        seen: list[Any] = []

        def add(obj: Any) -> None:
            nt = obj if isinstance(obj, NodeType) else build_node_type(obj, plugin, ports_by_cls)
            nt.plugin = plugin
            nt.plugin_module = self.plugins[plugin].module.split(":")[0].strip()
            if nt.name in staged:
                raise PluginError(f"plugin '{plugin}': node type '{nt.name}' is declared twice")
            self._check_clash(nt.name, plugin)
            staged[nt.name] = nt

        for obj in objs:
            if not any(obj is s for s in seen):  # declared and registered explicitly too: once
                seen.append(obj)
        _all_or_nothing([lambda obj=obj: add(obj) for obj in seen])
        self.node_types.update(staged)
        self.plugins[plugin].node_types.extend(staged)

    def _check_clash(self, name: str, plugin: str) -> None:
        if name not in self.node_types:
            return
        first = self.node_types[name].plugin
        if self.plugins[first].source == "builtin":
            raise PluginError(f"plugin '{plugin}': node type '{name}' is a built-in node type (plugin '{first}'); "
                              "a plugin cannot replace it: rename the node type")
        self.duplicates.setdefault(name, [first]).append(plugin)
        raise PluginError(f"plugin '{plugin}': node type '{name}' is already registered by plugin '{first}'; "
                          "a duplicate node type is an error (rename it, or limit plugins with FLUXKILN_PLUGINS)")

    def _commands_of(self, plugin: str, impl: Any) -> None:
        def taken(name: str) -> str | None:
            return self.commands[name].plugin if name in self.commands else None

        raw: list[Command] = []
        parsers = CommandParsers(plugin, taken)

        def register(name: Any, help: Any = "", main: Any = None) -> None:
            raw.append(raw_command(plugin, taken, name, help, main))

        kwargs = {"register": register, "subparsers": parsers}
        impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        staged = raw + parsers.commands()
        names = [c.name for c in staged]
        if len(set(names)) != len(names):
            raise PluginError(f"plugin '{plugin}': a command is registered twice ({', '.join(names)})")
        for cmd in staged:
            self.commands[cmd.name] = cmd
            self.plugins[plugin].commands.append(cmd.name)

    def _fail(self, plugin: str, message: str) -> None:
        """Mark a plugin failed and take back everything it registered, hooks included."""
        info = self.plugins[plugin]
        info.fail(message)
        for name in info.port_types:
            for lost in (name, list_name(name)):  # and the list port type derived from it
                self.port_types.pop(lost, None)
                self._lost_ports[lost] = plugin
        for name in info.node_types:
            self.node_types.pop(name, None)
        for name in info.commands:
            self.commands.pop(name, None)
        info.port_types, info.node_types, info.commands = [], [], []
        if self.pm.has_plugin(plugin):
            self.pm.unregister(name=plugin)

    def _drop_orphans(self) -> None:
        """Fail plugins whose node types use a port type that a failed plugin took back with it."""
        changed = True
        while changed:
            changed = False
            for plugin in self._loaded():
                for name in self.plugins[plugin].node_types:
                    nt = self.node_types[name]
                    used = {*nt.outputs.values(), *(p for spec in nt.params.values() for p in spec.ports)}
                    gone = sorted(used - set(self.port_types))
                    if gone:
                        owner = self._lost_ports.get(gone[0], "?")
                        self._fail(plugin, f"plugin '{plugin}': node type '{name}' uses port type '{gone[0]}' "
                                           f"of plugin '{owner}', which failed to load")
                        changed = True
                        break

    # ------------------------------------------------------------ use
    def failed_plugins(self) -> list[PluginInfo]:
        """Plugins that failed to import or register (each contributes nothing)."""
        return [p for p in self.plugins.values() if p.error]

    def plugin_of(self, node_type: str) -> str | None:
        """The name of the plugin that registered ``node_type``, or None if no plugin did."""
        nt = self.node_types.get(node_type)
        return nt.plugin if nt else None

    def emit(self, event: Event) -> None:
        """Deliver an event to every observer; a failing observer is reported, never fatal."""
        for impl in self.pm.hook.on_event.get_hookimpls():
            try:
                impl.function(event=event)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - observers must not break (or end) a run
                print(f"fluxkiln: observer '{impl.plugin_name}' failed on {event.event}: {short_error(exc)}",
                      file=sys.stderr)

    @contextlib.contextmanager
    def observing(self, *observers: Any) -> Iterator[None]:
        """Register observer objects (with an ``on_event`` hookimpl) for the duration of a block."""
        for obs in observers:
            self.pm.register(obs)
        try:
            yield
        finally:
            for obs in observers:
                self.pm.unregister(obs)

    def prepare_run(self, recipe: Any) -> None:
        """Let plugins start their background preparations for a recipe about to run; a failure is reported,
        never fatal (the run does the work itself then)."""
        for impl in self.pm.hook.prepare_run.get_hookimpls():
            try:
                impl.function(recipe=recipe)
            except Exception as exc:  # noqa: BLE001 - a preparation must not stop a run
                print(f"fluxkiln: plugin '{impl.plugin_name}' failed to prepare the run: {short_error(exc)}",
                      file=sys.stderr)

    def resolve_model(self, ref: str) -> str | None:
        """Ask plugins to resolve a prefixed model reference; None if no plugin claims it."""
        return self.pm.hook.resolve_model(ref=ref)


def _all_or_nothing(steps: list[Callable[[], None]]) -> None:
    """Run every step; if any raised PluginError, raise one naming every problem (the plugin then fails)."""
    errors = []
    for step in steps:
        try:
            step()
        except PluginError as exc:
            errors.append(str(exc))
    if errors:
        raise PluginError("; ".join(errors))


def _declared_nodes(obj: Any) -> list[Any]:
    """``@node`` functions and classes defined in a plugin module (or its package): registered without a hook."""
    if not isinstance(obj, types.ModuleType):
        return []
    prefix = obj.__name__ + "."
    return [v for v in vars(obj).values() if getattr(v, "__fluxkiln_node__", None) is not None
            and (getattr(v, "__module__", "") == obj.__name__ or getattr(v, "__module__", "").startswith(prefix))]


def _dist_name(ep: Any) -> str | None:
    return ep.dist.name if ep.dist else None
