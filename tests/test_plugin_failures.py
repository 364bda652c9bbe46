"""A bad plugin never breaks the built-ins or fluxkiln: clashes, partial registration, sys.exit and Ctrl-C at
import, missing modules, failing observers, `fluxkiln plugins --check`, and short, close suggestions."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from fluxkiln.engine import PortType, RecipeInvalid, Text, hookimpl, node
from fluxkiln.engine import registry as registry_mod
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.validate import check_file

ROOT = Path(__file__).resolve().parent.parent

CLASH = """
from fluxkiln.engine import Text, hookimpl, node

@node("sample")
def my_sample(prompt: str = "x") -> Text:
    '''Shadows the built-in sample.'''
    return Text(prompt)

@node("clash_extra")
def clash_extra() -> Text:
    '''An innocent node of the same plugin.'''
    return Text("x")
"""

HALF = """
from fluxkiln.engine import Text, hookimpl, node

@node("half_good")
def half_good() -> Text:
    '''Registered before the failure.'''
    return Text("x")

@hookimpl
def register_node_types(register):
    register(half_good)
    raise RuntimeError("failed halfway")

@hookimpl
def check_recipe(recipe):
    return [recipe.problem("the failed plugin's check ran")]
"""

GOOD = """
from fluxkiln.engine import Text, node

@node("good_node")
def good_node() -> Text:
    '''Works.'''
    return Text("ok")
"""

SAMPLE_RECIPE = """
[recipe]
name = "uses-sample"

[nodes.base]
type = "load_model"
model = "builtin:tiny-flux"

[nodes.pics]
type = "sample"
model = "@base"
prompt = "a lighthouse"
seed = 1
"""


def fluxkiln(*args: str, env: dict[str, str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k not in ("FLUXKILN_PLUGINS", "FLUXKILN_PLUGIN_MODULES")} | extra
    return subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def plugins_json(env: dict[str, str], cwd: Path) -> dict[str, dict]:
    res = fluxkiln("plugins", "--json", env=env, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout)}


def test_a_plugin_shadowing_a_builtin_fails_and_the_builtin_stays_usable(installed_plugin, tmp_path):
    plugin = installed_plugin("clash_plug", CLASH, name="clash")
    recipe = tmp_path / "r.toml"
    recipe.write_text(SAMPLE_RECIPE)
    res = fluxkiln("validate", str(recipe), env=plugin.env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr  # not "registered by several plugins"
    by = plugins_json(plugin.env, tmp_path)
    assert by["clash"]["error"] == ("plugin 'clash': node type 'sample' is a built-in node type (plugin "
                                    "'fluxkiln.plugins.flux'); a plugin cannot replace it: rename the node type")
    assert by["clash"]["node_types"] == [] and "sample" in by["fluxkiln.plugins.flux"]["node_types"]
    recipe.write_text('[recipe]\nname = "r"\n[nodes.x]\ntype = "clash_extra"\n')
    res = fluxkiln("validate", str(recipe), env=plugin.env, cwd=tmp_path)
    assert res.returncode == 2 and "unknown node type 'clash_extra'" in res.stderr  # nothing of it stays


def test_a_plugin_failing_halfway_contributes_nothing(fluxkiln_registry, monkeypatch, tmp_path):
    (tmp_path / "half_plug.py").write_text(HALF)
    monkeypatch.syspath_prepend(str(tmp_path))
    import half_plug

    reg = fluxkiln_registry(half_plug, allow_errors=True)
    info = reg.plugins["half_plug"]
    assert info.error == f"RuntimeError: failed halfway ({tmp_path / 'half_plug.py'}:12)"
    assert info.node_types == [] and "half_good" not in reg.node_types and reg.plugin_of("half_good") is None
    assert not reg.pm.has_plugin("half_plug")  # its other hooks are gone too

    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "r"\n[nodes.a]\ntype = "half_good"\n')
    with pytest.raises(RecipeInvalid) as exc:
        check_file(recipe, reg, [])
    [problem] = exc.value.problems
    assert problem.message == "unknown node type 'half_good'"  # and not "the failed plugin's check ran"


@dataclass
class Colour:
    hex: str


@node("make_colour")
def make_colour() -> Colour:
    """A colour."""
    return Colour("#fff")


@node("use_colour")
def use_colour(colour: Colour) -> Text:
    """Uses another plugin's port type."""
    return Text(colour.hex)


def test_a_port_type_of_a_failed_plugin_takes_its_users_along(fluxkiln_registry):
    class Owner:
        __name__ = "owner"

        @hookimpl
        def register_port_types(self, register):
            register(PortType("colour", Colour, "A colour."))

        @hookimpl
        def register_node_types(self, register):
            register(make_colour)
            register(make_colour)  # the same object twice is fine
            raise ValueError("late failure")

    class User:
        __name__ = "user"

        @hookimpl
        def register_node_types(self, register):
            register(use_colour)

    reg = fluxkiln_registry(Owner(), User(), allow_errors=True)
    assert "colour" not in reg.port_types and reg.plugins["owner"].port_types == []
    assert reg.plugins["user"].error == ("plugin 'user': node type 'use_colour' uses port type 'colour' of plugin "
                                         "'owner', which failed to load")
    assert "use_colour" not in reg.node_types and "make_colour" not in reg.node_types


def test_plugins_check_exits_non_zero_when_a_plugin_failed(installed_plugin, tmp_path):
    good = installed_plugin("good_plug", GOOD, name="good")
    assert fluxkiln("plugins", "--check", env=good.env, cwd=tmp_path).returncode == 0
    assert fluxkiln("plugins", "--check", "--json", env=good.env, cwd=tmp_path).returncode == 0
    bad = installed_plugin("clash_plug", CLASH, name="clash")
    res = fluxkiln("plugins", "--check", env=bad.env, cwd=tmp_path, COLUMNS="200")
    assert res.returncode == 1
    assert "fluxkiln plugins --check: 1 plugin(s) failed to load: clash" in res.stderr
    as_json = fluxkiln("plugins", "--check", "--json", env=bad.env, cwd=tmp_path)
    assert as_json.returncode == 1 and json.loads(as_json.stdout)
    assert fluxkiln("plugins", env=bad.env, cwd=tmp_path).returncode == 0  # listing alone still succeeds


@pytest.mark.parametrize(("source", "error"), [
    ("import sys\nsys.exit(3)\n", "SystemExit: the plugin called sys.exit(3) ({file}:2)"),
    ("import sys\nsys.exit()\n", "SystemExit: the plugin called sys.exit(None) ({file}:2)"),
    ("raise KeyboardInterrupt\n", "KeyboardInterrupt: raised by the plugin ({file}:1)"),
], ids=["exit-3", "exit", "keyboard-interrupt"])
def test_exit_or_ctrl_c_at_import_ends_no_command(installed_plugin, tmp_path, source, error):
    plugin = installed_plugin("rude_plug", source, name="rude")
    helped = fluxkiln("--help", env=plugin.env, cwd=tmp_path)
    assert helped.returncode == 0 and "validate" in helped.stdout
    by = plugins_json(plugin.env, tmp_path)
    assert by["rude"]["error"] == error.format(file=plugin.site / "rude_plug.py")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "r"\n[nodes.a]\ntype = "save"\nimages = "@a"\n')
    assert fluxkiln("validate", str(recipe), env=plugin.env, cwd=tmp_path).returncode == 2


def test_a_missing_module_names_the_entry_point_and_module(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "fluxkiln_ghost-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fluxkiln-ghost\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fluxkiln]\nghost = fluxkiln_ghost.nodes\n")
    monkeypatch.syspath_prepend(str(site))
    error = Registry.load().plugins["ghost"].error
    assert error == ("ModuleNotFoundError: entry point 'ghost = fluxkiln_ghost.nodes' of distribution "
                     "'fluxkiln-ghost' names module 'fluxkiln_ghost.nodes', which cannot be imported (No module "
                     "named 'fluxkiln_ghost'); reinstall it (pip install --force-reinstall fluxkiln-ghost) or fix "
                     "the entry point")
    assert "importlib" not in error


def test_an_observer_raising_system_exit_does_not_end_the_run(run_recipe, capsys):
    class Exiter:
        __name__ = "exiter"

        @hookimpl
        def on_event(self, event):
            raise SystemExit(7)

    run = run_recipe('[recipe]\nname = "r"\n[nodes.a]\ntype = "test_images"\n', plugins=[Exiter()])
    assert run.status == "ok" and run.nodes == {"a": "ran"}
    err = capsys.readouterr().err
    assert "fluxkiln: observer 'exiter' failed on run_started: SystemExit: the plugin called sys.exit(7)" in err
    assert err.count("observer 'exiter' failed") == len(run.events)  # every event, never silently


def test_missing_plugin_suggests_only_close_names(installed_plugin, tmp_path):
    plugin = installed_plugin("good_plug", GOOD, name="good", distribution="fluxkiln-good")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "r"\nplugins = ["fluxkiln-goood", "fluxkiln-datasets", "zebra"]\n'
                      '[nodes.b]\ntype = "good_node"\n')
    res = fluxkiln("validate", str(recipe), "--json", env=plugin.env, cwd=tmp_path)
    hints = [p["hint"] for p in json.loads(res.stdout)]
    assert hints == ["pip install fluxkiln-goood; did you mean 'fluxkiln-good'?",
                     "pip install fluxkiln-datasets", "pip install zebra"]


def test_builtins_come_from_fluxkilns_own_entry_points(monkeypatch):
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["fluxkiln"]
    reg = Registry.load(entry_points=False)
    builtin = {n: p.module for n, p in reg.plugins.items() if p.source == "builtin"}
    assert builtin == declared and all(p.distribution == "fluxkiln" for p in reg.plugins.values())
    assert reg.commands["tui"].plugin == "fluxkiln.tui" and reg.plugin_of("save") == "fluxkiln.plugins.io"

    everything = metadata.entry_points
    monkeypatch.setattr(registry_mod.metadata, "entry_points", lambda group: [
        ep for ep in everything(group=group) if ep.name != "fluxkiln.plugins.io"])
    assert "save" not in Registry.load().node_types  # no other list of built-ins exists

    monkeypatch.setattr(registry_mod.metadata, "entry_points", lambda group: [])
    reg = Registry.load()
    assert reg.node_types == {} and reg.plugins["fluxkiln"].error == registry_mod.NOT_INSTALLED


def test_engine_imports_neither_the_plugins_nor_the_tui():
    bad = []
    for path in sorted((ROOT / "engine").glob("*.py")):
        for tree_node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in tree_node.names] if isinstance(tree_node, ast.Import) else \
                [f"{'.' * tree_node.level}{tree_node.module or ''}"] if isinstance(tree_node, ast.ImportFrom) else []
            bad += [f"{path.name}:{tree_node.lineno} imports {n}" for n in names
                    if n.startswith(("fluxkiln.plugins", "fluxkiln.tui", "..plugins", "..tui"))]
    assert bad == []
    code = ("import sys; from fluxkiln.engine import cli, runner, validate, testing; "
            "print(sorted(m for m in sys.modules if m.startswith(('fluxkiln.plugins', 'fluxkiln.tui'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


def test_every_builtin_plugin_package_has_an_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = set(project["project"]["entry-points"]["fluxkiln"].values())
    packages = {p for p in project["tool"]["setuptools"]["packages"] if p.count(".") == 2
                and p.startswith("fluxkiln.plugins.")}
    missing = sorted(packages - declared)  # every subpackage of plugins/ is a built-in plugin
    assert missing == [], "add to [project.entry-points.fluxkiln] in pyproject.toml, then pip install -e ."
