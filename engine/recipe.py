"""The recipe language: read a TOML recipe into a :class:`Recipe`.

Handles ``[recipe]``, ``[vars]`` with ``${name}`` substitution, ``[nodes.<id>]``
tables and their ``[nodes.<id>.sweep]`` tables, ``"@id"`` / ``"@id.port"``
links, the ``"@@"`` escape and ``--set KEY=VALUE`` overrides.  Checks that need node types (unknown keys,
types, ranges, links) live in :mod:`fluxkiln.engine.validate`.
"""

from __future__ import annotations

import difflib
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem
from .paths import probe
from .tomllines import key_lines, line_of

NODE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
VAR_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
TOP_LEVEL = ("recipe", "vars", "nodes")
MAX_NESTING = 32  # arrays/tables inside one another; real recipes use 2 or 3
SWEEP = "sweep"  # the reserved node key of a sweep table
RECIPE_KEYS = ("name", "description", "output_dir", "plugins", "gpu_hour_price", "seed")


@dataclass(frozen=True)
class Link:
    """A reference to another node's output: ``"@node"`` or ``"@node.port"``."""

    node: str
    port: str | None = None
    as_list: bool = False  # set by validation: a single value feeding a list[X] input arrives as a list of one

    def __str__(self) -> str:
        return f"@{self.node}" + (f".{self.port}" if self.port else "")

    def take(self, outputs: dict[str, dict[str, Any]]) -> Any:
        """This link's value from the outputs of the nodes that ran (node id -> port -> value)."""
        value = outputs[self.node][self.port or next(iter(outputs[self.node]))]
        return [value] if self.as_list else value


@dataclass
class NodeSpec:
    """One ``[nodes.<id>]`` table after substitution; links are :class:`Link`."""

    id: str
    type: str
    values: dict[str, Any]
    line: int | None = None
    key_lines: dict[str, int] = field(default_factory=dict)
    sweep: Any = None  # the [nodes.<id>.sweep] table: key -> list of values (links as Link), when given
    sweep_lines: dict[str, int] = field(default_factory=dict)

    def links(self) -> dict[str, list[Link]]:
        """Every link of this node, its sweep's included."""
        out: dict[str, list[Link]] = {}
        sweep = self.sweep if isinstance(self.sweep, dict) else {}
        for key, v in [*self.values.items(), *sweep.items()]:
            found = [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, Link)]
            if found:
                out.setdefault(key, []).extend(found)
        return out

    def cells(self, limit: int = 4096) -> list[dict[str, Any]]:
        """The values of each sweep cell (the node's values with one value per swept key), or just the values."""
        sweep = self.sweep if isinstance(self.sweep, dict) else {}
        axes = {k: v for k, v in sweep.items() if isinstance(v, list) and v}
        if not axes:
            return [self.values]
        combos = itertools.islice(itertools.product(*axes.values()), limit)
        return [{**self.values, **dict(zip(axes, combo, strict=True))} for combo in combos]


@dataclass
class Recipe:
    """A parsed recipe."""

    path: Path | None
    text: str
    name: str
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, NodeSpec] = field(default_factory=dict)
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @property
    def file(self) -> str:
        return str(self.path) if self.path else "<recipe>"

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def problem(self, message: str, *, node: str | None = None, key: str | None = None,
                hint: str | None = None, line: int | None = None) -> Problem:
        """A :class:`Problem` located at the node/key (or given line) of this recipe."""
        if line is None:
            path = ("nodes", node, key) if node and key else ("nodes", node) if node else ("recipe", key) if key else ()
            line = line_of(self.lines, *[p for p in path if p]) if path else None
            if node and key and node in self.nodes and key in self.nodes[node].key_lines:
                line = self.nodes[node].key_lines[key]
        return Problem(message, self.file, line, node, key, hint)


def _toml_error_line(exc: tomllib.TOMLDecodeError) -> int | None:
    m = re.search(r"line (\d+)", str(exc))
    return int(m.group(1)) if m else getattr(exc, "lineno", None)


def _too_deep(value: Any) -> bool:
    """True if lists/tables in ``value`` nest deeper than :data:`MAX_NESTING` (checked without recursion)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth >= MAX_NESTING:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _nesting_problems(data: dict[str, Any], lines: dict[tuple[str, ...], int], file: str) -> list[Problem]:
    """A problem for every key whose value nests too deeply (later steps recurse over values)."""
    out = []
    for top, table in data.items():
        items = table.items() if isinstance(table, dict) else [("", table)]
        for key, value in items:
            rows = value.items() if top == "nodes" and isinstance(value, dict) else [("", value)]
            for sub, v in rows:
                if _too_deep(v):
                    path = [p for p in (top, key, sub) if p]
                    out.append(Problem(f"the value of {'.'.join(path)} is nested more than {MAX_NESTING} levels "
                                       "deep", file, line_of(lines, *path),
                                       node=key if top == "nodes" else None, key=sub or None,
                                       hint="a recipe value is a string, number, boolean or a short list"))
    return out


def _deep_line(text: str) -> int | None:
    """The first line where brackets nest past :data:`MAX_NESTING` (to locate a parser recursion error)."""
    depth = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        for c in raw:
            depth += (c in "[{") - (c in "]}")
            if depth > MAX_NESTING:
                return lineno
    return None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``nodes.a.seed=7`` -> (["nodes","a","seed"], 7); the value is read as TOML, else a string."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. nodes.images.seed=7")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw
    if _too_deep(value):
        raise ValueError(f"--set {key}=...: the value is nested more than {MAX_NESTING} levels deep")
    parts = key.strip().split(".")
    if len(parts) < 2 or parts[0] not in TOP_LEVEL or not all(parts):
        close = difflib.get_close_matches(parts[0], list(TOP_LEVEL), n=1)
        guess = f" (did you mean '{'.'.join([close[0], *parts[1:]])}={raw}'?)" if close and len(parts) > 1 else ""
        raise ValueError(f"--set {item!r}: KEY must be nodes.<id>.<key>, vars.<name> or recipe.<key>{guess}")
    return parts, value


class _Subst:
    """Substitutes ``${var}`` in strings, recording undefined names."""

    def __init__(self, variables: dict[str, Any]):
        self.vars = variables
        self.undefined: list[str] = []

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            whole = re.fullmatch(r"\$\{([^}]*)\}", value)
            if whole and whole.group(1) in self.vars:
                return self.vars[whole.group(1)]
            return VAR_REF.sub(self._one, value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        return value

    def _one(self, m: re.Match) -> str:
        if m.group(0) == "$${":
            return "${"
        name = m.group(1)
        if name not in self.vars:
            self.undefined.append(name)
            return m.group(0)
        return str(self.vars[name])


def _to_link(value: Any) -> Any:
    if isinstance(value, list):
        return [_to_link(v) for v in value]
    if not isinstance(value, str) or not value.startswith("@"):
        return value
    if value.startswith("@@"):
        return value[1:]
    body = value[1:]
    node, _, port = body.partition(".")
    return Link(node, port or None)


def _sweep_table(raw: Any, subst: _Subst, problems: list[Problem], file: str, nid: str, line: int | None,
                 lines: dict[tuple[str, ...], int]) -> tuple[Any, dict[str, int]]:
    """A node's ``sweep`` table with variables substituted and links parsed (checked by validation)."""
    if not isinstance(raw, dict):
        problems.append(Problem(f"'{SWEEP}' must be a table of lists, got {raw!r}", file, line, nid, SWEEP,
                                hint=f'write [nodes.{nid}.sweep] with lists, e.g. seed = [1, 2, 3]'))
        return None, {}
    table, klines = {}, {}
    for key, value in raw.items():
        kline = lines.get(("nodes", nid, SWEEP, key), line)
        if kline is not None:
            klines[key] = kline
        subst.undefined.clear()
        table[key] = _to_link(subst(value))
        for var in subst.undefined:
            problems.append(Problem(f"undefined variable ${{{var}}}", file, kline, nid, f"{SWEEP}.{key}"))
    return table, klines


def parse_recipe(text: str, path: Path | None = None, overrides: list[str] | None = None) -> tuple[Recipe, list[Problem]]:
    """Parse recipe text; return the recipe and every problem found at this level."""
    file = str(path) if path else "<recipe>"
    problems: list[Problem] = []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        return Recipe(path, text, ""), [Problem(f"TOML syntax error: {msg}", file, _toml_error_line(exc),
                                                hint="fix the TOML syntax; see https://toml.io")]
    except RecursionError:
        return Recipe(path, text, ""), [Problem(f"arrays or tables are nested too deeply to read (more than "
                                                f"{MAX_NESTING} levels are never needed)", file, _deep_line(text),
                                                hint="a recipe value is a string, number, boolean or a short list")]
    lines = key_lines(text)
    deep = _nesting_problems(data, lines, file)
    if deep:
        return Recipe(path, text, "", lines=lines), deep
    recipe = Recipe(path, text, "", lines=lines, overrides=list(overrides or []))
    for item in overrides or []:
        try:
            parts, value = parse_override(item)
        except ValueError as exc:
            problems.append(Problem(str(exc), "--set"))
            continue
        if parts[0] == "nodes" and parts[1] not in (data.get("nodes") or {}):
            ids = list(data.get("nodes") or {})
            close = difflib.get_close_matches(parts[1], ids, n=1)
            guess = f" (did you mean '{'.'.join(['nodes', close[0], *parts[2:]])}'?)" if close else ""
            problems.append(Problem(f"--set {item!r}: there is no node '{parts[1]}'{guess}", "--set", node=parts[1],
                                    hint="nodes: " + ", ".join(ids)))
            continue
        target = data
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                problems.append(Problem(f"--set {item!r}: '{p}' is not a table", "--set"))
                break
        else:
            target[parts[-1]] = value
    for key in data:
        if key not in TOP_LEVEL:
            problems.append(Problem(f"unknown table [{key}]", file, line_of(lines, key),
                                    hint="allowed: " + ", ".join(f"[{t}]" for t in TOP_LEVEL)))
    head = data.get("recipe")
    if not isinstance(head, dict) or not head.get("name"):
        problems.append(Problem("missing [recipe] name", file, line_of(lines, "recipe") or 1, key="name",
                                hint='add [recipe] with name = "my-recipe" (it names the run folder runs/<name>/)'))
        head = head if isinstance(head, dict) else {}
    name = head.get("name", "")
    if name and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)):
        problems.append(Problem(f"[recipe] name {name!r} is not a valid folder name", file, line_of(lines, "recipe", "name"),
                                key="name", hint="use letters, digits, '.', '_' and '-'"))
        name = ""
    for key in head:
        if key not in RECIPE_KEYS:
            problems.append(Problem(f"unknown key '{key}' in [recipe]", file, line_of(lines, "recipe", key), key=key,
                                    hint="allowed: " + ", ".join(RECIPE_KEYS)))
    recipe.name = name or ""
    recipe.description = str(head.get("description", ""))
    recipe.options = {k: v for k, v in head.items() if k not in ("name", "description")}
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        problems.append(Problem("[vars] must be a table", file, line_of(lines, "vars")))
        variables = {}
    recipe.vars = dict(variables)
    nodes = data.get("nodes") or {}
    if not isinstance(nodes, dict):
        problems.append(Problem("[nodes] must hold tables [nodes.<id>]", file, line_of(lines, "nodes")))
        nodes = {}
    if not nodes:
        problems.append(Problem("the recipe has no nodes", file, line_of(lines, "recipe") or 1,
                                hint="add a table [nodes.<id>] with a type, e.g. type = \"load_model\""))
    for nid, table in nodes.items():
        nline = line_of(lines, "nodes", nid)
        if not NODE_ID.match(nid):
            problems.append(Problem(f"node id '{nid}' is not allowed", file, nline, node=nid,
                                    hint="node ids start with a letter or '_' and hold letters, digits, '_' and '-'"))
            continue
        if not isinstance(table, dict):
            problems.append(Problem(f"nodes.{nid} must be a table", file, nline, node=nid))
            continue
        subst = _Subst(recipe.vars)
        sweep: Any = None
        sweep_lines: dict[str, int] = {}
        values: dict[str, Any] = {}
        klines: dict[str, int] = {}
        for key, raw in table.items():
            kline = lines.get(("nodes", nid, key), nline)
            if kline is not None:
                klines[key] = kline
            if key == "type":
                continue
            if key == SWEEP:
                sweep, sweep_lines = _sweep_table(raw, subst, problems, file, nid, kline, lines)
                continue
            subst.undefined.clear()
            value = subst(raw)
            for var in subst.undefined:
                problems.append(Problem(f"undefined variable ${{{var}}}", file, kline, nid, key,
                                        hint=("defined: " + ", ".join(sorted(recipe.vars))) if recipe.vars else "define it in [vars]"))
            values[key] = _to_link(value)
        ntype = table.get("type")
        if not isinstance(ntype, str) or not ntype:
            problems.append(Problem("missing 'type'", file, nline, nid, "type",
                                    hint='every node needs type = "<node type>"; `fluxkiln nodes` lists them'))
            ntype = ""
        recipe.nodes[nid] = NodeSpec(nid, ntype, values, nline, klines, sweep, sweep_lines)
    return recipe, problems


def _missing_recipe(p: Path) -> Problem:
    """'recipe file not found', with the file the user probably meant (``.toml`` added, or a close name)."""
    folder = p.parent if p.parent.is_dir() else None
    candidates = [p.parent / (p.name + ".toml")] if p.suffix != ".toml" else []
    found = [c for c in candidates if c.is_file()]
    if not found and folder is not None:
        names = sorted(c.name for c in folder.glob("*.toml"))
        found = [folder / n for n in difflib.get_close_matches(p.name, names, n=1, cutoff=0.6)]
    guess = f" (did you mean {found[0]}?)" if found else ""
    hint = "give the recipe's .toml file" if found else "check the path (relative to the current folder)"
    return Problem(f"recipe file not found: {p}{guess}", str(p), hint=hint)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, list[Problem]]:
    """Read and parse a recipe file."""
    p = Path(path)
    why = probe(p)
    if why not in (None, "not found") or p.is_dir():
        return Recipe(p, "", ""), [Problem(f"cannot read the recipe: {why or 'it is a folder'}", str(p),
                                           hint="give the path of a .toml recipe file")]
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Recipe(p, "", ""), [_missing_recipe(p)]
    except (OSError, UnicodeDecodeError) as exc:
        return Recipe(p, "", ""), [Problem(f"cannot read recipe: {exc}", str(p))]
    return parse_recipe(text, p, overrides)
