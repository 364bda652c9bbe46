"""`fluxkiln new-plugin NAME`: name checks, never overwriting, and what the skeleton contains."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib

import pytest

from fluxkiln.engine.cli import main as cli_main


def new_plugin(name: str, parent) -> int:
    return cli_main(["new-plugin", name, "--dir", str(parent)])


def test_skeleton_files_and_entry_point(tmp_path, capsys):
    assert new_plugin("fluxkiln-color-pop", tmp_path / "work") == 0  # --dir is created
    root = tmp_path / "work" / "fluxkiln-color-pop"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["README.md", "example.toml", "fluxkiln_color_pop/__init__.py", "pyproject.toml",
                     "tests/test_fluxkiln_color_pop.py"]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "fluxkiln-color-pop"
    assert meta["project"]["entry-points"]["fluxkiln"] == {"color-pop": "fluxkiln_color_pop"}
    assert meta["project"]["dependencies"][0].startswith("fluxkiln>=")
    assert meta["tool"]["setuptools"]["packages"] == ["fluxkiln_color_pop"]
    for py in (root / "fluxkiln_color_pop" / "__init__.py", root / "tests" / "test_fluxkiln_color_pop.py"):
        ast.parse(py.read_text())
        assert "{{" not in py.read_text()
    assert '@node("color_pop"' in (root / "fluxkiln_color_pop" / "__init__.py").read_text()
    out = capsys.readouterr().out
    assert "plugin 'color-pop', node type 'color_pop'" in out and "pip install -e" in out
    assert not [p for p in (tmp_path / "work").iterdir() if p.name.startswith(".")]  # no staging left


def test_skeleton_module_loads_fast_without_heavy_imports(tmp_path):
    assert new_plugin("fluxkiln-light", tmp_path) == 0
    code = ("import sys, fluxkiln_light; from fluxkiln.engine.registry import Registry; "
            "r = Registry.load(extra=[fluxkiln_light], entry_points=False); "
            "assert r.plugins['fluxkiln_light'].error is None, r.plugins['fluxkiln_light'].error; "
            "assert 'light' in r.node_types; "
            "print(sorted(m for m in ('torch', 'diffusers', 'PIL', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "fluxkiln-light", capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_refuses_to_overwrite_an_existing_folder(tmp_path, capsys):
    target = tmp_path / "fluxkiln-mine"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert new_plugin("fluxkiln-mine", tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{target} already exists; nothing was written" in err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fluxkiln-mine"]


@pytest.mark.parametrize(("name", "why"), [
    ("Fluxkiln-Upscale", "use lowercase letters, digits and single hyphens"),
    ("fluxkiln_upscale", "use lowercase letters, digits and single hyphens"),
    ("9lives", "use lowercase letters, digits and single hyphens"),
    ("my--plugin", "use lowercase letters, digits and single hyphens"),
    ("upscale-", "use lowercase letters, digits and single hyphens"),
    ("../evil", "use lowercase letters, digits and single hyphens"),
    ("", "use lowercase letters, digits and single hyphens"),
    ("fluxkiln", "taken by fluxkiln itself"),
    ("class", "clashes with a Python name"),
    ("json", "clashes with a Python name"),
    ("x" * 61, "too long"),
])
def test_bad_names_are_refused_with_a_clear_error(name, why, tmp_path, capsys):
    assert new_plugin(name, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxkiln new-plugin: ") and why in err
    assert list(tmp_path.iterdir()) == []


def test_node_type_that_exists_already_gets_another_name(tmp_path, capsys):
    assert new_plugin("fluxkiln-save", tmp_path) == 0
    assert "node type 'my_save'" in capsys.readouterr().out
    assert '@node("my_save"' in (tmp_path / "fluxkiln-save" / "fluxkiln_save" / "__init__.py").read_text()


def test_cli_help_lists_new_plugin():
    res = subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", "new-plugin", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "--dir" in res.stdout
