"""Validation: check a parsed recipe against the registered node types.

Reports every problem in one pass (each with file, line, node, key, what was
wrong and what is allowed) and, for a valid recipe, yields the resolved nodes
the runner executes.  Nothing heavy is imported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import graph as graphmod
from . import paths
from . import sweep as sweepmod
from .errors import Problem, RecipeInvalid
from .nodes import NodeType, ParamSpec
from .ports import describe_port, list_name
from .recipe import Link, Recipe, load_recipe, parse_recipe
from .registry import Registry

ENV_REF = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")


@dataclass
class ResolvedNode:
    """A node ready to run: its type, literal parameters (validated, files absolute) and links."""

    id: str
    type: NodeType
    params: dict[str, Any] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    secrets: dict[str, str | None] = field(default_factory=dict)  # key -> env var name
    sweep: list[sweepmod.Axis] = field(default_factory=list)  # swept keys, before expansion into cells
    cell: dict[str, Any] | None = None  # a sweep cell: {"node", "axes", "values"}


@dataclass
class Checked:
    """A validated recipe: the recipe, its graph, execution order and resolved nodes."""

    recipe: Recipe
    graph: Any
    order: list[str]
    nodes: dict[str, ResolvedNode]
    sweeps: dict[str, list[str]] = field(default_factory=dict)  # swept node id -> its cells' ids


def _close(word: str, options: list[str]) -> str:
    found = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    return ("did you mean " + " or ".join(f"'{f}'" for f in found) + "?") if found else ""


def _close_plugin(name: str, reg: Registry) -> str:
    """Suggest installed plugins whose name or distribution is close to ``name`` (fluxkiln's own are not)."""
    def bare(word: str) -> str:
        return word.lower().removeprefix("fluxkiln-").removeprefix("fluxkiln_")

    options = {bare(n): n for p in reg.plugins.values() if p.source != "builtin"
               for n in (p.name, p.distribution) if n}
    found = difflib.get_close_matches(bare(name), list(options), n=3, cutoff=0.75)
    return ("did you mean " + " or ".join(f"'{options[f]}'" for f in found) + "?") if found else ""


_UNRESOLVED = Path("<unresolved>")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile value must not flood the terminal)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _hint(*parts: str) -> str | None:
    text = "; ".join(p for p in parts if p)
    return text or None


class _Checker:
    def __init__(self, recipe: Recipe, registry: Registry):
        self.r = recipe
        self.reg = registry
        self.problems: list[Problem] = []
        self.resolved: dict[str, ResolvedNode] = {}
        self.output_types = {nid: sweepmod.joined_outputs(registry.node_types[spec.type], registry.port_types)
                             for nid, spec in recipe.nodes.items()
                             if spec.sweep and spec.type in registry.node_types}

    def add(self, message: str, node: str | None = None, key: str | None = None, hint: str | None = None) -> None:
        self.problems.append(self.r.problem(message, node=node, key=key, hint=hint))

    def run(self) -> None:
        self._check_plugins()
        self._check_output_dir()
        for nid, spec in self.r.nodes.items():
            if not spec.type:
                continue
            nt = self.reg.node_types.get(spec.type)
            if nt is None:
                self._unknown_type(nid, spec.type)
                continue
            if spec.type in self.reg.duplicates:
                self.add(f"node type '{spec.type}' is registered by several plugins: "
                         + ", ".join(self.reg.duplicates[spec.type]), nid, "type",
                         "uninstall one, or limit installed plugins with FLUXKILN_PLUGINS")
            self._check_node(nid, spec.values, nt, spec.sweep if isinstance(spec.sweep, dict) else {})
            if spec.sweep is not None and nid in self.resolved:
                self._check_sweep(self.resolved[nid], spec)

    def _check_plugins(self) -> None:
        wanted = self.r.options.get("plugins") or []
        if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
            self.add("[recipe] plugins must be a list of plugin names", key="plugins")
            return
        for name in wanted:
            info = self.reg.plugins.get(name) or next(
                (p for p in self.reg.plugins.values() if p.distribution and p.distribution.lower() == name.lower()), None)
            if info is None:
                self.add(f"required plugin '{name}' is not installed", key="plugins",
                         hint=_hint(f"pip install {name}", _close_plugin(name, self.reg)))
            elif info.error:
                self.add(f"required plugin '{name}' failed to load: {info.error}", key="plugins")

    def _check_output_dir(self) -> None:
        raw = self.r.options.get("output_dir")
        if raw is None:
            return
        if not isinstance(raw, str) or not raw:
            self.add(f"[recipe] output_dir must be a folder path, got {_short(raw)}", key="output_dir")
            return
        try:
            folder = paths.expand(raw, self.r.base_dir)
        except paths.BadPath as exc:
            self.add(f"invalid output_dir {_short(raw)}: {exc}", key="output_dir")
            return
        why = paths.probe(folder)
        if why not in (None, "not found"):
            self.add(f"output_dir: {why}", key="output_dir")

    def _unknown_type(self, nid: str, tname: str) -> None:
        failed = [p.name for p in self.reg.failed_plugins()]
        extra = (f"{len(failed)} plugin(s) failed to load ({', '.join(failed)}): `fluxkiln plugins` says why"
                 if failed else "")
        self.add(f"unknown node type '{tname}'", nid, "type",
                 _hint(_close(tname, sorted(self.reg.node_types)), extra, "`fluxkiln nodes` lists the node types"))

    def _check_node(self, nid: str, values: dict[str, Any], nt: NodeType, swept: dict[str, Any]) -> None:
        rn = ResolvedNode(nid, nt)
        for key in values:
            if key not in nt.params:
                self.add(f"unknown parameter '{key}' for node type '{nt.name}'", nid, key,
                         _hint(_close(key, list(nt.params)), "allowed: " + ", ".join(nt.params)))
        for key, spec in nt.params.items():
            if key not in values:
                if spec.required and key not in swept:
                    kind = "input" if spec.is_input and not spec.accepts_literal else "parameter"
                    self.add(f"missing required {kind} '{key}'", nid, key, "expected " + spec.allowed())
                elif spec.accepts_literal:
                    rn.params[key] = spec.default
                continue
            self._check_value(rn, key, values[key], spec)
        self.resolved[nid] = rn

    def _check_value(self, rn: ResolvedNode, key: str, value: Any, spec: ParamSpec) -> None:
        nid = rn.id
        if isinstance(value, list) and any(isinstance(v, Link) for v in value):
            self.add("a list of links is not allowed here", nid, key, "expected " + spec.allowed())
            return
        if isinstance(value, Link):
            if not spec.is_input:
                self.add(f"a link ({value}) where a literal belongs", nid, key,
                         _hint("expected " + spec.allowed(), "write '@@…' for a string starting with '@'"))
                return
            self._check_link(rn, key, value, spec)
            return
        if not spec.accepts_literal:
            self.add(f"expected a link, got the literal {_short(value)}", nid, key,
                     _hint("expected " + spec.allowed(), 'write "@<node id>" to link a node\'s output'))
            return
        if spec.is_secret:
            self._check_secret(rn, key, value)
            return
        converted, err = spec.check_literal(value)
        if err:
            self.add(f"invalid value {_short(value)}: {err}", nid, key, "expected " + spec.allowed())
            return
        if spec.is_file and isinstance(converted, str):
            path = self._local_file(nid, key, converted, spec)
            if path is None:
                return
            if path is not _UNRESOLVED:
                rn.files[key] = path
                converted = str(path)
        rn.params[key] = converted

    def _local_file(self, nid: str, key: str, raw: str, spec: ParamSpec) -> Path | None:
        """The resolved local file or folder, ``_UNRESOLVED`` for a reference the node resolves, or None
        after reporting a problem (missing, unreadable, not a regular file, a bad path)."""
        try:
            path = paths.expand(raw, self.r.base_dir)
        except paths.BadPath as exc:
            self.add(f"invalid path {_short(raw)}: {exc}", nid, key)
            return None
        why = paths.probe(path)
        marker = spec.file_marker
        if why == "not found" and marker is not None and marker.passes_unresolved(raw):
            return _UNRESOLVED  # not a local file: the node resolves it (e.g. a hub file)
        if why == "not found":
            self.add(f"file not found: {_clip(raw)} (looked in {path.parent})", nid, key,
                     "paths are relative to the recipe file")
            return None
        if why is not None:
            self.add(why, nid, key)
            return None
        if not os.access(path, os.R_OK):
            self.add(f"file is not readable: {_clip(raw)}", nid, key, "check its permissions")
            return None
        return path.resolve()

    def _check_sweep(self, rn: ResolvedNode, spec: Any) -> None:
        """Each swept key is a key of the node, given a non-empty list of values valid for it."""
        table, nt = spec.sweep, rn.type
        if not table:
            self.add("the sweep table is empty", rn.id, "sweep", "give lists of values, e.g. seed = [1, 2, 3]")
            return
        axes = []
        for key, values in table.items():
            line = spec.sweep_lines.get(key)
            where = dict(node=rn.id, key=f"sweep.{key}", line=line)
            if key not in nt.params:
                self.problems.append(self.r.problem(
                    f"unknown parameter '{key}' for node type '{nt.name}' in its sweep", **where,
                    hint=_hint(_close(key, list(nt.params)), "allowed: " + ", ".join(nt.params))))
            elif key in spec.values:
                self.problems.append(self.r.problem(f"'{key}' is both set and swept", **where,
                                                    hint=f"remove '{key}' from the node or from its sweep"))
            elif nt.params[key].is_secret:
                self.problems.append(self.r.problem("a secret cannot be swept", **where))
            elif not isinstance(values, list) or not values:
                self.problems.append(self.r.problem(
                    f"a sweep value must be a non-empty list, got {values!r}", **where,
                    hint=f"e.g. {key} = [{values!r}, ...]; expected a list of " + nt.params[key].allowed()))
            else:
                axis = self._sweep_axis(rn, key, values, line)
                if axis is not None:
                    axes.append(axis)
        if axes and len(axes) == len(table):
            rn.sweep = axes
            if sweepmod.cell_count(axes) > sweepmod.MAX_CELLS:
                self.problems.append(self.r.problem(
                    f"the sweep makes {sweepmod.cell_count(axes)} cells, more than {sweepmod.MAX_CELLS}",
                    node=rn.id, key="sweep", line=spec.sweep_lines.get(axes[0].key),
                    hint="sweep fewer values, or split the study over several nodes"))

    def _sweep_axis(self, rn: ResolvedNode, key: str, values: list[Any], line: int | None) -> sweepmod.Axis | None:
        found: list[sweepmod.AxisValue] = []
        labels: dict[str, int] = {}
        ok = True
        for i, value in enumerate(values):
            tmp = ResolvedNode(rn.id, rn.type)
            before = len(self.problems)
            self._check_value(tmp, key, value, rn.type.params[key])
            if len(self.problems) > before:
                self.problems[before:] = [dataclasses.replace(
                    p, line=line or p.line, key=f"sweep.{key}", message=f"sweep value {i + 1} ({value}): {p.message}")
                    for p in self.problems[before:]]
                ok = False
                continue
            label = sweepmod.value_label(value, i)
            if label in labels:
                self.problems.append(self.r.problem(
                    f"sweep value {i + 1} ({value}) repeats value {labels[label] + 1}", node=rn.id,
                    key=f"sweep.{key}", line=line, hint="give each value once"))
                ok = False
                continue
            labels[label] = i
            found.append(sweepmod.AxisValue(label, sweepmod.shown_value(value), sweepmod.recipe_value(value),
                                            tmp.params, tmp.links, tmp.files))
        return sweepmod.Axis(key, found) if ok else None

    def _check_secret(self, rn: ResolvedNode, key: str, value: Any) -> None:
        if value is None:
            rn.secrets[key] = None
            return
        m = ENV_REF.match(value) if isinstance(value, str) else None
        if not m:
            self.add("a secret must not be written in the recipe", rn.id, key,
                     'put it in an environment variable and write "$VAR_NAME" (or leave the key out)')
            return
        rn.secrets[key] = m.group(1)

    def _check_link(self, rn: ResolvedNode, key: str, link: Link, spec: ParamSpec) -> None:
        target = self.r.nodes.get(link.node)
        if target is None:
            self.add(f"link to missing node '{link.node}'", rn.id, key,
                     _hint(_close(link.node, list(self.r.nodes)), "nodes: " + ", ".join(self.r.nodes)))
            return
        tnt = self.reg.node_types.get(target.type)
        if tnt is None:
            return  # reported on the target itself
        if not tnt.outputs:
            self.add(f"node '{link.node}' (type '{tnt.name}') has no outputs to link", rn.id, key)
            return
        port = link.port or next(iter(tnt.outputs))
        if port not in tnt.outputs:
            self.add(f"link to missing port '{link.port}' of node '{link.node}' (type '{tnt.name}')", rn.id, key,
                     "ports: " + ", ".join(f"'{p}'" for p in tnt.outputs))
            return
        ptype = self.output_types.get(link.node, tnt.outputs).get(port, tnt.outputs[port])
        as_list = ptype not in spec.ports and list_name(ptype) in spec.ports
        if ptype not in spec.ports and not as_list:
            takes = " or ".join(f"'{describe_port(p)}'" for p in spec.ports)
            self.add(f"port type mismatch: {link} is '{describe_port(ptype)}', but '{key}' takes {takes}", rn.id, key,
                     f"link a node whose output is {takes}")
            return
        rn.links[key] = Link(link.node, port, as_list)


def check(recipe: Recipe, registry: Registry, problems: list[Problem] | None = None) -> tuple[Checked | None, list[Problem]]:
    """Validate a parsed recipe; return (checked recipe or None, every problem found)."""
    problems = list(problems or [])
    checker = _Checker(recipe, registry)
    checker.run()
    problems += checker.problems
    g = graphmod.build(recipe)
    cycle = graphmod.find_cycle(g)
    if cycle:
        problems.append(recipe.problem("cycle: " + " -> ".join(cycle), node=cycle[0],
                                       hint="a node cannot read its own output, directly or through others"))
    for extra in registry.pm.hook.check_recipe(recipe=recipe):
        problems += list(extra or [])
    problems.sort(key=lambda p: (p.file != "--set", p.line or 0))
    if problems:
        return None, problems
    return sweepmod.expand(Checked(recipe, g, graphmod.order(g), checker.resolved), registry.port_types), []


def check_file(path: str | Path, registry: Registry, overrides: list[str] | None = None) -> Checked:
    """Load and validate a recipe file; raise :class:`RecipeInvalid` listing every problem."""
    recipe, problems = load_recipe(path, overrides)
    if problems and not recipe.nodes:
        raise RecipeInvalid(problems)
    checked, problems = check(recipe, registry, problems)
    if checked is None:
        raise RecipeInvalid(problems)
    return checked


def check_text(text: str, registry: Registry, path: Path | None = None,
               overrides: list[str] | None = None) -> tuple[Checked | None, list[Problem]]:
    """Validate recipe text (e.g. from the TUI editor); never raises for bad input."""
    recipe, problems = parse_recipe(text, path, overrides)
    if problems and not recipe.nodes:
        return None, problems
    return check(recipe, registry, problems)
