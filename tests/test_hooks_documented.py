"""Every hook is documented in the plugin guide with its exact signature, and has a test named after it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOOKSPECS = ROOT / "engine" / "hookspecs.py"
GUIDE = ROOT / "docs" / "plugins.md"
TESTS = ROOT / "tests"


def _hookspecs() -> list[ast.FunctionDef]:
    tree = ast.parse(HOOKSPECS.read_text())
    specs = [n for n in tree.body if isinstance(n, ast.FunctionDef)
             and any(ast.unparse(d).startswith("hookspec") for d in n.decorator_list)]
    assert len(specs) >= 5, "expected the hookspecs of engine/hookspecs.py"
    return specs


def _signature(fn: ast.FunctionDef) -> str:
    return f"def {fn.name}({ast.unparse(fn.args)}) -> {ast.unparse(fn.returns)}:"


def _guide_hooks_section() -> str:
    text = GUIDE.read_text()
    m = re.search(r"^## Hooks\n(.*?)^## ", text, flags=re.S | re.M)
    assert m, "docs/plugins.md needs a '## Hooks' section"
    return m.group(1)


@pytest.mark.parametrize("spec", _hookspecs(), ids=lambda s: s.name)
def test_hook_is_documented_with_its_exact_signature(spec):
    section = _guide_hooks_section()
    assert f"### `{spec.name}`" in section, f"docs/plugins.md: add a '### `{spec.name}`' heading under '## Hooks'"
    assert _signature(spec) in section, f"docs/plugins.md: document `{spec.name}` as `{_signature(spec)}`"
    body = section.split(f"### `{spec.name}`", 1)[1].split("\n### ", 1)[0]
    assert "@hookimpl" in body, f"docs/plugins.md: give an example implementation of `{spec.name}`"


def test_guide_documents_no_hook_that_does_not_exist():
    documented = set(re.findall(r"^### `(\w+)`", _guide_hooks_section(), flags=re.M))
    assert documented == {s.name for s in _hookspecs()}


@pytest.mark.parametrize("spec", _hookspecs(), ids=lambda s: s.name)
def test_hook_has_a_test_named_after_it(spec):
    wanted = f"test_hook_{spec.name}"
    found = [p.name for p in TESTS.rglob("test_*.py")
             if any(isinstance(n, ast.FunctionDef) and n.name == wanted for n in ast.walk(ast.parse(p.read_text())))]
    assert found, f"write a test function named {wanted} (in tests/)"


@pytest.mark.parametrize("spec", _hookspecs(), ids=lambda s: s.name)
def test_hook_has_a_typed_signature_and_one_line_docstring(spec):
    args = spec.args.args + spec.args.kwonlyargs
    assert all(a.annotation is not None for a in args) and spec.returns is not None, f"type every argument of {spec.name}"
    doc = ast.get_docstring(spec) or ""
    assert doc and "\n" not in doc.strip(), f"{spec.name} needs a one-line docstring"
