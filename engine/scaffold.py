"""``fluxkiln new-plugin NAME``: write a ready-to-install plugin skeleton.

The skeleton is a package with a ``pyproject.toml`` declaring the entry point
(group ``fluxkiln``), one node, tests that use fluxkiln's pytest fixtures, an
example recipe and a README.  It is written to a temporary folder and renamed
into place, so it never overwrites anything and is never left half-written.
"""

from __future__ import annotations

import keyword
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
RESERVED_NODE_TYPES = {"test_images"}
FILES = {  # template -> path in the skeleton ({package} is filled in)
    "plugin_pyproject.toml.tmpl": "pyproject.toml",
    "plugin_README.md.tmpl": "README.md",
    "plugin_init.py.tmpl": "{package}/__init__.py",
    "plugin_test.py.tmpl": "tests/test_{package}.py",
    "plugin_example.toml.tmpl": "example.toml",
}


@dataclass(frozen=True)
class Names:
    """The names a plugin skeleton uses."""

    dist: str  # distribution (pip install NAME), also the folder name
    package: str  # importable package
    plugin: str  # entry point name, shown by `fluxkiln plugins`
    node: str  # the example node type (and its function name)


def plugin_names(name: str, taken_node_types: set[str] | None = None) -> Names:
    """Check NAME and derive the package, plugin and node names; ValueError says what is wrong."""
    if not NAME_RE.fullmatch(name or ""):
        raise ValueError(f"invalid plugin name {name!r}: use lowercase letters, digits and single hyphens, "
                         "starting with a letter, e.g. fluxkiln-upscale")
    if len(name) > 60:
        raise ValueError(f"plugin name {name!r} is too long: use at most 60 characters")
    if name == "fluxkiln" or name.startswith("fluxkiln-plugins"):
        raise ValueError(f"plugin name {name!r} is taken by fluxkiln itself: choose another, e.g. fluxkiln-upscale")
    short = name.removeprefix("fluxkiln-") or name
    package = name.replace("-", "_")
    node = short.replace("-", "_")
    if keyword.iskeyword(package) or keyword.iskeyword(node) or package in sys.stdlib_module_names:
        raise ValueError(f"plugin name {name!r} clashes with a Python name: choose another, e.g. fluxkiln-{short}")
    if node in (taken_node_types or set()) | RESERVED_NODE_TYPES:
        node = f"my_{node}"
    return Names(dist=name, package=package, plugin=short, node=node)


def _fluxkiln_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("fluxkiln").split(".")
    except PackageNotFoundError:
        return "0.1"
    return ".".join(parts[:2])


def render(template: str, names: Names) -> str:
    """Fill ``{{dist}}``, ``{{package}}``, ``{{plugin}}``, ``{{node}}`` and ``{{fluxkiln_version}}``."""
    text = resources.files("fluxkiln.engine").joinpath("templates", template).read_text(encoding="utf-8")
    values = {"dist": names.dist, "package": names.package, "plugin": names.plugin, "node": names.node,
              "fluxkiln_version": _fluxkiln_version()}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)


def write_skeleton(names: Names, parent: Path) -> Path:
    """Write the skeleton to ``parent/<dist>``; FileExistsError if that exists."""
    target = parent / names.dist
    if target.exists():
        raise FileExistsError(f"{target} already exists; nothing was written. Choose another name, "
                              "another --dir, or remove the folder")
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{names.dist}.tmp-{secrets.token_hex(6)}"
    staging.mkdir()  # not mkdtemp (0700): the skeleton gets the user's umask like any folder they make
    try:
        for template, rel in FILES.items():
            path = staging / rel.format(package=names.package)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(template, names), encoding="utf-8")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _taken_node_types() -> set[str]:
    from .registry import Registry

    return set(Registry.load().node_types)


def new_plugin_main(name: str, parent_dir: str) -> int:
    """The ``fluxkiln new-plugin NAME [--dir D]`` command; exit 0 on success, 2 on a bad name or existing folder."""
    try:
        names = plugin_names(name, _taken_node_types())
        target = write_skeleton(names, Path(parent_dir).expanduser())
    except (ValueError, FileExistsError) as exc:
        print(f"fluxkiln new-plugin: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fluxkiln new-plugin: cannot write the plugin: {exc}", file=sys.stderr)
        return 2
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    print(f"created {target} (distribution {names.dist}, plugin '{names.plugin}', node type '{names.node}'):")
    for f in files:
        print(f"  {f}")
    print("next steps:")
    print(f"  cd {target}")
    print('  pip install -e ".[test]"      # registers the entry point')
    print(f"  fluxkiln nodes {names.node}")
    print("  pytest")
    return 0
