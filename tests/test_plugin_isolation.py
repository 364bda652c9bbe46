"""Discovery and isolation of installed plugins: import failures, duplicates, FLUXKILN_PLUGINS,
required plugins, and failures inside a plugin's node — each reported exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

GOOD = """
from fluxkiln.engine import Text, hookimpl, node

@node("good_node")
def good_node(word: str = "ok") -> Text:
    '''A node that works.'''
    return Text(word)

@hookimpl
def register_node_types(register):
    register(good_node)
"""

BROKEN = "import math\nraise RuntimeError('boom at import')\n"

EXPLODING = """
from fluxkiln.engine import Text, hookimpl, node

@node("blank")
def blank() -> Text:
    '''Only spaces.'''
    return Text("   ")

@node("explode")
def explode(text: Text) -> Text:
    '''Fails at run time.'''
    return Text(str(1 / len(text.strip())))

@hookimpl
def register_node_types(register):
    register(blank)
    register(explode)
"""


def dup_plugin(node_type: str) -> str:
    return f"""
from fluxkiln.engine import Text, hookimpl, node

@node({node_type!r})
def impl() -> Text:
    '''Same name as another plugin's node.'''
    return Text("x")

@hookimpl
def register_node_types(register):
    register(impl)
"""


def fluxkiln(*args: str, env: dict[str, str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k not in ("FLUXKILN_PLUGINS", "FLUXKILN_PLUGIN_MODULES")} | extra
    return subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def plugins_json(env: dict[str, str], cwd: Path, **extra: str) -> dict[str, dict]:
    res = fluxkiln("plugins", "--json", env=env, cwd=cwd, **extra)
    assert res.returncode == 0, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout)}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def good_and_broken(installed_plugin):
    installed_plugin("good_plug", GOOD, name="good", distribution="fluxkiln-good", version="1.2.3")
    return installed_plugin("broken_plug", BROKEN, name="broken", distribution="fluxkiln-broken")


def test_plugin_that_raises_on_import_is_reported_and_others_load(good_and_broken, tmp_path):
    by = plugins_json(good_and_broken.env, tmp_path)
    broken, good = by["broken"], by["good"]
    site = good_and_broken.site
    assert broken["error"] == f"RuntimeError: boom at import ({site / 'broken_plug.py'}:2)"
    assert broken["source"] == "entry point" and broken["distribution"] == "fluxkiln-broken"
    assert isinstance(broken["load_ms"], float) and broken["load_ms"] >= 0 and broken["node_types"] == []
    assert good == {"name": "good", "source": "entry point", "distribution": "fluxkiln-good", "version": "1.2.3",
                    "load_ms": good["load_ms"], "node_types": ["good_node"], "port_types": [], "commands": [],
                    "error": None}
    assert by["fluxkiln.plugins.io"]["error"] is None  # built-ins unaffected

    table = fluxkiln("plugins", env=good_and_broken.env, cwd=tmp_path, COLUMNS="300")
    assert table.returncode == 0 and "failed: RuntimeError: boom at import" in table.stdout


def test_recipe_using_a_failed_plugins_node_type_names_the_plugin(good_and_broken, tmp_path):
    recipe = write(tmp_path / "r.toml", '[recipe]\nname = "r"\n\n[nodes.a]\ntype = "broken_node"\n\n'
                                        '[nodes.b]\ntype = "good_node"\n')
    res = fluxkiln("validate", str(recipe), env=good_and_broken.env, cwd=tmp_path)
    assert res.returncode == 2
    [line, summary] = res.stderr.splitlines()  # one line, however long the plugin's error is
    assert line.startswith(f"{recipe}:5: node 'a' key 'type': unknown node type 'broken_node'")
    assert "1 plugin(s) failed to load (broken): `fluxkiln plugins` says why" in line
    assert "boom at import" not in line and len(line) < 400
    assert summary == "1 problem(s) found"  # good_node is fine


def test_required_plugins_are_checked(good_and_broken, tmp_path):
    recipe = write(tmp_path / "r.toml", '[recipe]\nname = "r"\nplugins = ["good", "fluxkiln-broken", "fluxkiln-nope"]\n'
                                        '[nodes.b]\ntype = "good_node"\n')
    res = fluxkiln("validate", str(recipe), "--json", env=good_and_broken.env, cwd=tmp_path)
    assert res.returncode == 2
    messages = [p["message"] for p in json.loads(res.stdout)]
    assert messages == ["required plugin 'fluxkiln-broken' failed to load: RuntimeError: boom at import "
                        f"({good_and_broken.site / 'broken_plug.py'}:2)",
                        "required plugin 'fluxkiln-nope' is not installed"]
    recipe.write_text(recipe.read_text().replace(', "fluxkiln-broken", "fluxkiln-nope"', ', "fluxkiln-good"'))
    assert fluxkiln("validate", str(recipe), env=good_and_broken.env, cwd=tmp_path).returncode == 0


def test_duplicate_node_type_is_reported_naming_both_plugins(installed_plugin, tmp_path):
    installed_plugin("dup_one", dup_plugin("twin"), name="one")
    plugin = installed_plugin("dup_two", dup_plugin("twin"), name="two")
    by = plugins_json(plugin.env, tmp_path)
    owner, loser = sorted(("one", "two"), key=lambda n: bool(by[n]["error"]))
    assert by[owner]["node_types"] == ["twin"] and by[owner]["error"] is None
    assert by[loser]["node_types"] == []
    assert by[loser]["error"] == (f"plugin '{loser}': node type 'twin' is already registered by plugin '{owner}'; "
                                  "a duplicate node type is an error (rename it, or limit plugins with FLUXKILN_PLUGINS)")

    recipe = write(tmp_path / "r.toml", '[recipe]\nname = "r"\n[nodes.t]\ntype = "twin"\n')
    res = fluxkiln("validate", str(recipe), env=plugin.env, cwd=tmp_path)
    assert res.returncode == 2
    assert f"node type 'twin' is registered by several plugins: {owner}, {loser}" in res.stderr

    # FLUXKILN_PLUGINS resolves the clash
    assert fluxkiln("validate", str(recipe), env=plugin.env, cwd=tmp_path, FLUXKILN_PLUGINS="two").returncode == 0


def test_plugin_cannot_override_a_builtin_node_type(installed_plugin, tmp_path):
    plugin = installed_plugin("my_save", dup_plugin("save"), name="my-save")
    by = plugins_json(plugin.env, tmp_path)
    assert by["fluxkiln.plugins.io"]["error"] is None and by["fluxkiln.plugins.io"]["node_types"] == ["save", "grid"]
    assert by["my-save"]["error"] == ("plugin 'my-save': node type 'save' is a built-in node type (plugin "
                                      "'fluxkiln.plugins.io'); a plugin cannot replace it: rename the node type")
    assert by["my-save"]["node_types"] == []


def test_fluxkiln_plugins_limits_what_loads(good_and_broken, installed_plugin, tmp_path):
    env = installed_plugin("exploding_plug", EXPLODING, name="exploding", distribution="fluxkiln-exploding").env
    everything = plugins_json(env, tmp_path)
    assert {"good", "broken", "exploding"} <= set(everything)
    only = plugins_json(env, tmp_path, FLUXKILN_PLUGINS="good, fluxkiln-exploding")  # entry point or distribution
    assert {"good", "exploding"} <= set(only) and "broken" not in only
    assert {n for n, p in only.items() if p["source"] == "builtin"} == {n for n, p in everything.items()
                                                                       if p["source"] == "builtin"}
    none_match = plugins_json(env, tmp_path, FLUXKILN_PLUGINS="nothing-like-this")
    assert all(p["source"] == "builtin" for p in none_match.values())


def test_exception_inside_a_node_names_the_plugin(installed_plugin, tmp_path):
    plugin = installed_plugin("exploding_plug", EXPLODING, name="exploding")
    recipe = write(tmp_path / "r.toml", '[recipe]\nname = "r"\n[nodes.w]\ntype = "blank"\n'
                                        '[nodes.x]\ntype = "explode"\ntext = "@w"\n')
    res = fluxkiln("run", str(recipe), "--json", env=plugin.env, cwd=tmp_path)
    assert res.returncode == 1
    [failed] = [e for e in map(json.loads, res.stdout.splitlines()) if e["event"] == "node_failed"]
    assert failed["plugin"] == "exploding" and failed["node"] == "x" and failed["type"] == "explode"
    assert failed["error_type"] == "ZeroDivisionError" and failed["inputs"] == {"text": "Text"}
    assert failed["where"].startswith(str(plugin.site / "exploding_plug.py"))

    human = fluxkiln("run", str(recipe), env=plugin.env, cwd=tmp_path)
    assert human.returncode == 1
    assert "✗ x (explode, plugin exploding) failed: ZeroDivisionError: division by zero" in human.stderr
