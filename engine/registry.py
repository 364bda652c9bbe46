"""The plugin manager: load plugins and hold the node and port types they register.

Built-in plugins (``fluxkiln.plugins.DEFAULT_PLUGINS``) and installed ones
(entry-point group ``fluxkiln``) are loaded the same way.  A plugin that fails
to import or to register is reported with its error and load time, and the
others still load.  ``FLUXKILN_PLUGINS`` (comma-separated distribution or
plugin names) limits which installed plugins load; ``FLUXKILN_PLUGIN_MODULES``
(comma-separated importable module names) loads plugins that are not
installed, for developing a plugin without packaging it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

BUILTIN_COMMANDS = ("run", "watch", "validate", "graph", "nodes", "plugins", "cache", "inspect", "new-plugin", "tui")
from .events import Event
from .nodes import NodeType, build_node_type
from .ports import ALIASES, PortType, by_annotation, with_lists

ENTRY_POINT_GROUP = "fluxkiln"
ENV_ALLOW = "FLUXKILN_PLUGINS"
ENV_MODULES = "FLUXKILN_PLUGIN_MODULES"


@dataclass
class PluginInfo:
    """What ``fluxkiln plugins`` shows about one plugin."""

    name: str
    module: str
    source: str  # "builtin", "entry point" or "extra"
    version: str | None = None
    distribution: str | None = None
    load_time: float = 0.0
    error: str | None = None
    node_types: list[str] = field(default_factory=list)
    port_types: list[str] = field(default_factory=list)


def _short_error(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Registry:
    """Loaded plugins, node types and port types; delivers events to observers."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.node_types: dict[str, NodeType] = {}
        self.port_types: dict[str, PortType] = {}
        self.duplicates: dict[str, list[str]] = {}
        self.commands: dict[str, tuple[str, Any, str]] = {}  # name -> (help, main, plugin)

    # ------------------------------------------------------------ loading
    @classmethod
    def load(cls, extra: list[Any] | None = None, *, entry_points: bool = True, builtins: bool = True) -> Registry:
        """Load built-in plugins, installed plugins and ``extra`` plugin objects or modules."""
        reg = cls()
        if builtins:
            from fluxkiln.plugins import DEFAULT_PLUGINS

            for modname in DEFAULT_PLUGINS:
                reg._add_module(modname, modname, "builtin", "fluxkiln")
        if entry_points:
            reg._add_entry_points()
        for modname in filter(None, (m.strip() for m in os.environ.get(ENV_MODULES, "").split(","))):
            if modname not in reg.plugins:
                reg._add_module(modname, modname, "module", None)
        for i, obj in enumerate(extra or []):
            name = getattr(obj, "__name__", None) or f"extra-{i}"
            reg._add_object(obj, name, "extra")
        reg._register_all()
        return reg

    def _add_module(self, modname: str, name: str, source: str, dist: str | None) -> None:
        t0 = time.perf_counter()
        info = PluginInfo(name=name, module=modname, source=source, distribution=dist,
                          version=_dist_version(dist))
        self.plugins[name] = info
        try:
            module = importlib.import_module(modname)
            self.pm.register(module, name=name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
            info.error = _short_error(exc)
        info.load_time = time.perf_counter() - t0

    def _add_object(self, obj: Any, name: str, source: str) -> None:
        info = PluginInfo(name=name, module=getattr(obj, "__module__", name) or name, source=source)
        self.plugins[name] = info
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:  # noqa: BLE001
            info.error = _short_error(exc)

    def _add_entry_points(self) -> None:
        allow = {a.strip().lower() for a in os.environ.get(ENV_ALLOW, "").split(",") if a.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else None
            if allow and ep.name.lower() not in allow and (dist or "").lower() not in allow:
                continue
            if ep.name in self.plugins:
                continue
            t0 = time.perf_counter()
            info = PluginInfo(name=ep.name, module=ep.value, source="entry point", distribution=dist,
                              version=ep.dist.version if ep.dist else None)
            self.plugins[ep.name] = info
            try:
                obj = ep.load()
                self.pm.register(obj, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
                info.error = _short_error(exc)
            info.load_time = time.perf_counter() - t0

    def _impls(self, hook_name: str) -> list[Any]:
        """Implementations in registration order: built-ins first, so they can never be overridden."""
        return list(getattr(self.pm.hook, hook_name).get_hookimpls())

    def _register_all(self) -> None:
        for impl in self._impls("register_port_types"):
            self._call_register(impl, self._register_port)
        self.port_types = with_lists(self.port_types)  # list[X] for every port type X
        ports_by_cls = by_annotation(self.port_types)
        for impl in self._impls("register_node_types"):
            self._call_register(impl, lambda obj, plugin: self._register_node(obj, plugin, ports_by_cls))
        for impl in self._impls("register_commands"):
            self._call_command_register(impl)

    def _call_command_register(self, impl: Any) -> None:
        plugin = impl.plugin_name

        def register(name: str, help: str, main: Any) -> None:
            if name in self.commands or name in BUILTIN_COMMANDS:
                owner = self.commands[name][2] if name in self.commands else "fluxkiln"
                raise PluginError(f"plugin '{plugin}': command '{name}' is already provided by '{owner}'")
            if not callable(main):
                raise PluginError(f"plugin '{plugin}': command '{name}' needs a callable main(argv) -> int")
            self.commands[name] = (help, main, plugin)

        self._call_register(impl, lambda obj, _plugin: register(*obj))

    def _call_register(self, impl: Any, fn: Any) -> None:
        """Call one plugin's register hook; each rejected object is reported, the rest still register."""
        plugin = impl.plugin_name
        info = self.plugins.get(plugin)
        errors: list[str] = []

        def register(*obj: Any) -> None:
            try:
                fn(obj[0] if len(obj) == 1 else obj, plugin)
            except PluginError as exc:
                errors.append(str(exc))

        t0 = time.perf_counter()
        try:
            impl.function(register=register)
        except Exception as exc:  # noqa: BLE001 - report, keep the other plugins
            errors.append(str(exc) if isinstance(exc, PluginError) else _short_error(exc))
        if info:
            for msg in errors:
                info.error = f"{info.error}; {msg}" if info.error else msg
            info.load_time += time.perf_counter() - t0

    def _register_port(self, pt: PortType, plugin: str) -> None:
        if not isinstance(pt, PortType):
            raise PluginError(f"plugin '{plugin}': register_port_types must register PortType values, got {pt!r}")
        if "[" in pt.name or pt.name in ALIASES:
            raise PluginError(f"plugin '{plugin}': port type name '{pt.name}' is reserved; list[X] port types are "
                              "derived from every port type X by the engine")
        if pt.name in self.port_types:
            raise PluginError(f"plugin '{plugin}': port type '{pt.name}' is already registered")
        self.port_types[pt.name] = pt
        self.plugins[plugin].port_types.append(pt.name)

    def _register_node(self, obj: Any, plugin: str, ports_by_cls: dict[type, PortType]) -> None:
        nt = obj if isinstance(obj, NodeType) else build_node_type(obj, plugin, ports_by_cls)
        nt.plugin = plugin
        if nt.name in self.node_types:
            first = self.node_types[nt.name].plugin
            self.duplicates.setdefault(nt.name, [first]).append(plugin)
            raise PluginError(f"plugin '{plugin}': node type '{nt.name}' is already registered by plugin '{first}'; "
                              "a duplicate node type is an error (rename it, or limit plugins with FLUXKILN_PLUGINS)")
        self.node_types[nt.name] = nt
        self.plugins[plugin].node_types.append(nt.name)

    # ------------------------------------------------------------ use
    def failed_plugins(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.error]

    def emit(self, event: Event) -> None:
        """Deliver an event to every observer; a failing observer is reported, not fatal."""
        for impl in self._impls("on_event"):
            try:
                impl.function(event=event)
            except Exception as exc:  # noqa: BLE001 - observers must not break a run
                print(f"fluxkiln: observer '{impl.plugin_name}' failed on {event.event}: {_short_error(exc)}",
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

    def resolve_model(self, ref: str) -> str | None:
        """Ask plugins to resolve a prefixed model reference; None if no plugin claims it."""
        return self.pm.hook.resolve_model(ref=ref)

    def plugin_of(self, node_type: str) -> str | None:
        nt = self.node_types.get(node_type)
        return nt.plugin if nt else None


def _dist_version(dist: str | None) -> str | None:
    if not dist:
        return None
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
