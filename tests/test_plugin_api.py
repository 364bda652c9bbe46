"""The plugin author's API: one-step registration, NodeError(key=) located in the recipe, development mode,
what `fluxkiln nodes` says about lengths and patterns, and the skeleton's folder permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fluxkiln.engine.cli import main as cli_main

ONE_STEP = """
from fluxkiln.engine import Text, hookimpl, node
from fluxkiln.plugins.io import save   # another plugin's node: not registered again

@node("declared_only")
def declared_only(word: str = "hi") -> Text:
    '''Registered by being declared.'''
    return Text(word)

@node("declared_and_hooked")
def declared_and_hooked() -> Text:
    '''Declared and registered explicitly: once.'''
    return Text("x")

@hookimpl
def register_node_types(register):
    register(declared_and_hooked)
"""

KEYED = """
from fluxkiln.engine import NodeError, Text, node

@node("pick_font")
def pick_font(font: str = "x.ttf", size: int = 12) -> Text:
    '''Fails on a font it cannot use.'''
    raise NodeError(f"{font} is not a TrueType font", key="font", hint="give a .ttf file")
"""

DEV = """
from fluxkiln.engine import Text, node
from .helper import suffix

@node("greet", version="1")
def greet(name: str = "world") -> Text:
    '''Greets.'''
    return Text("hello " + name + suffix())
"""


def fluxkiln(*args: str, env: dict[str, str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k not in ("FLUXKILN_PLUGINS", "FLUXKILN_PLUGIN_MODULES",
                                                   "FLUXKILN_DEV")} | extra
    return subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_declaring_a_node_registers_it(installed_plugin, capsys):
    installed_plugin("one_step", ONE_STEP, name="one-step")
    from fluxkiln.engine.registry import Registry

    reg = Registry.load()
    info = reg.plugins["one-step"]
    assert info.error is None, info.error
    assert info.node_types == ["declared_and_hooked", "declared_only"]  # the hook's first, each once
    assert reg.plugin_of("save") == "fluxkiln.plugins.io"
    assert cli_main(["nodes", "declared_only"]) == 0
    assert "Registered by being declared." in capsys.readouterr().out


def test_node_error_key_is_shown_with_the_recipe_line(installed_plugin, tmp_path):
    plugin = installed_plugin("keyed_plug", KEYED, name="keyed")
    recipe = tmp_path / "fonts.toml"
    recipe.write_text('[recipe]\nname = "fonts"\n\n[nodes.title]\ntype = "pick_font"\nsize = 3\nfont = "comic.otf"\n')
    res = fluxkiln("run", str(recipe), env=plugin.env, cwd=tmp_path, FLUXKILN_CACHE=str(tmp_path / "c"))
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    at = lines.index("✗ title (pick_font, plugin keyed) failed: NodeError: comic.otf is not a TrueType font")
    assert lines[at + 1] == f"  {recipe}:7: node 'title' key 'font': comic.otf is not a TrueType font"
    assert "  hint: give a .ttf file" in lines[at + 2:]

    res = fluxkiln("run", str(recipe), "--json", env=plugin.env, cwd=tmp_path, FLUXKILN_CACHE=str(tmp_path / "c"))
    [failed] = [e for e in map(json.loads, res.stdout.splitlines()) if e["event"] == "node_failed"]
    assert (failed["key"], failed["file"], failed["line"]) == ("font", str(recipe), 7)


def _states(res: subprocess.CompletedProcess) -> dict[str, str]:
    assert res.returncode == 0, res.stderr
    out = {}
    for e in map(json.loads, res.stdout.splitlines()):
        if e["event"] == "node_started":
            out[e["node"]] = "ran: " + e["reason"]
        elif e["event"] == "node_cached":
            out[e["node"]] = "cached"
    return out


def test_development_mode_reruns_nodes_when_their_plugin_code_changes(tmp_path):
    pkg = tmp_path / "src" / "devplug"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(DEV)
    helper = pkg / "helper.py"
    helper.write_text("def suffix():\n    return '!'\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "dev"\n[nodes.hi]\ntype = "greet"\n')
    # prepended: where fluxkiln itself is on PYTHONPATH (a `pip install --target` folder) it must stay there
    path = os.pathsep.join(p for p in (str(tmp_path / "src"), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, FLUXKILN_CACHE=str(tmp_path / "cache"))

    def run(**extra: str) -> dict[str, str]:
        return _states(fluxkiln("run", str(recipe), "--json", env=env, cwd=tmp_path,
                                FLUXKILN_PLUGIN_MODULES="devplug", **extra))

    assert run(FLUXKILN_DEV="1") == {"hi": "ran: no cached result"}
    assert run(FLUXKILN_DEV="1") == {"hi": "cached"}
    helper.write_text("def suffix():\n    return '?'\n")  # a helper module of the package, same version
    assert run(FLUXKILN_DEV="1") == {"hi": "ran: plugin code changed"}
    assert (tmp_path / "runs" / "dev").is_dir()
    assert run(FLUXKILN_DEV="1") == {"hi": "cached"}

    assert run() == {"hi": "ran: development mode (FLUXKILN_DEV) switched off"}  # code is not hashed now
    helper.write_text("def suffix():\n    return '.'\n")
    assert run() == {"hi": "cached"}  # only `version` tells


def test_nodes_shows_lengths_and_patterns(installed_plugin, capsys):
    installed_plugin("shaped_plug", """
from typing import Annotated
from pydantic import Field
from fluxkiln.engine import Text, node

@node("shaped")
def shaped(
    slug: Annotated[str, Field(min_length=2, max_length=8, pattern=r"^[a-z-]+$", description="a slug")] = "ab",
    tags: Annotated[list[str], Field(min_length=1, max_length=4)] = ["x"],
    sizes: Annotated[list[int], Field(max_length=3)] = [],
    step: Annotated[int, Field(ge=16, multiple_of=16)] = 16,
) -> Text:
    '''Constrained keys.'''
    return Text(slug)
""", name="shaped")
    assert cli_main(["nodes", "shaped", "--json"]) == 0
    keys = {k["name"]: k for k in json.loads(capsys.readouterr().out)["keys"]}
    assert keys["slug"]["accepts"] == "a string (2 to 8 characters) matching the pattern ^[a-z-]+$"
    assert keys["slug"]["constraints"] == {"min_length": 2, "max_length": 8, "pattern": "^[a-z-]+$"}
    assert keys["tags"]["accepts"] == "a list of strings (1 to 4 items)"
    assert keys["sizes"]["accepts"] == "a list of integers (at most 3 items)"
    assert keys["step"]["accepts"] == "an integer ≥ 16, a multiple of 16"
    os.environ["COLUMNS"] = "200"
    try:
        assert cli_main(["nodes", "shaped"]) == 0
    finally:
        del os.environ["COLUMNS"]
    text = capsys.readouterr().out
    assert "(2 to 8 characters) matching the pattern ^[a-z-]+$" in text and "(1 to 4 items)" in text


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
def test_new_plugin_folders_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert cli_main(["new-plugin", "fluxkiln-modes", "--dir", str(tmp_path)]) == 0
    finally:
        os.umask(old)
    root = tmp_path / "fluxkiln-modes"
    for folder in (root, root / "fluxkiln_modes", root / "tests"):
        assert stat.S_IMODE(folder.stat().st_mode) == mode, folder
    assert stat.S_IMODE((root / "pyproject.toml").stat().st_mode) == 0o666 & ~umask
