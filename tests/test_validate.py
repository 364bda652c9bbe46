"""Validation reports every problem in one pass, each with file, line, node and key."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from typing import Annotated

from fluxkiln.engine import Images, InputFile, Secret, Text, hookimpl, node
from fluxkiln.engine.recipe import Link
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.validate import check_text
from helpers import textnodes


@pytest.fixture(scope="module")
def registry():
    return Registry.load(extra=[textnodes], entry_points=False)


def problems_of(registry, text, path=Path("/r/x.toml"), overrides=None):
    checked, problems = check_text(textwrap.dedent(text), registry, path, overrides)
    assert checked is None, "expected the recipe to be invalid"
    return problems


def find(problems, fragment):
    hits = [p for p in problems if fragment in p.message]
    assert hits, f"no problem containing {fragment!r} in: " + "\n".join(p.format() for p in problems)
    return hits[0]


def test_valid_recipe_passes(registry):
    checked, problems = check_text('[recipe]\nname="ok"\n[nodes.a]\ntype="const"\n[nodes.b]\ntype="concat"\nleft="@a"\n',
                                   registry, Path("/r/x.toml"))
    assert problems == [] and checked.order == ["a", "b"]


def test_toml_syntax_error_names_line(registry):
    p = problems_of(registry, '[recipe]\nname = "x"\n[nodes.a\ntype="const"\n')[0]
    assert "TOML syntax error" in p.message and p.line == 3 and p.file == "/r/x.toml"


def test_missing_recipe_name(registry):
    p = find(problems_of(registry, '[recipe]\ndescription="d"\n[nodes.a]\ntype="const"\n'), "missing [recipe] name")
    assert p.key == "name" and p.line == 1


ALL_AT_ONCE = '''\
[recipe]
name = "many"

[vars]
v = 1

[nodes.a]
type = "cnost"

[nodes.b]
type = "const"
valeu = "x"
repeat = "three"
scale = 2.5
mode = "c"

[nodes.c]
type = "concat"
left = "@nowhere"
right = "@b.nope"

[nodes.d]
type = "concat"
left = "literal text"
sep = "@b"

[nodes.e]
type = "concat"

[nodes.f]
type = "concat"
left = "@g"

[nodes.g]
type = "concat"
left = "@f"

[nodes.h]
type = "const"
value = "${undefined_var}"
scale = nan

[nodes.i]
type = "read_file"
path = "missing.txt"
'''


def line_in(text, node, key):
    """1-based line of `key =` inside [nodes.<node>] (or of the table header when key is None)."""
    lines = text.splitlines()
    start = lines.index(f"[nodes.{node}]")
    if key is None:
        return start + 1
    return next(i + 1 for i in range(start, len(lines)) if lines[i].split("=")[0].strip() == key)


def test_every_problem_reported_once_with_location(registry):
    problems = problems_of(registry, ALL_AT_ONCE)
    expect = [
        ("unknown node type 'cnost'", "a", "type", 8, "did you mean 'const'"),
        ("unknown parameter 'valeu'", "b", "valeu", 12, "did you mean 'value'"),
        ("invalid value 'three'", "b", "repeat", 13, "an integer from 1 to 10"),
        ("invalid value 2.5", "b", "scale", 14, "a number from 0.0 to 1.0"),
        ("invalid value 'c'", "b", "mode", 15, "one of 'a', 'b'"),
        ("link to missing node 'nowhere'", "c", "left", 19, "nodes:"),
        ("link to missing port 'nope'", "c", "right", 20, "ports: 'output'"),
        ("expected a link, got the literal 'literal text'", "d", "left", 24, "@<node id>"),
        ("a link (@b) where a literal belongs", "d", "sep", 25, "a string"),
        ("missing required input 'left'", "e", "left", 27, "link"),
        ("undefined variable ${undefined_var}", "h", "value", 40, "defined: v"),
        ("nan is not allowed", "h", "scale", 41, None),
        ("file not found: missing.txt", "i", "path", 45, "relative to the recipe"),
        ("cycle: f -> g -> f", "f", None, 30, None),
    ]
    for fragment, nid, key, line, hint in expect:
        p = find(problems, fragment)
        assert line in (line_in(ALL_AT_ONCE, nid, key), line_in(ALL_AT_ONCE, nid, None))
        assert (p.node, p.key, p.line, p.file) == (nid, key, line, "/r/x.toml"), p.format()
        if hint:
            assert hint in (p.hint or ""), p.format()
    assert len(problems) == len(expect), "\n".join(p.format() for p in problems)


def test_port_type_mismatch(registry):
    @node("want_images")
    def want_images(images: Images) -> None:
        """Takes images."""

    class Plug:
        @hookimpl
        def register_node_types(self, register):
            register(want_images)

    reg = Registry.load(extra=[textnodes, Plug()], entry_points=False)
    p = find(problems_of(reg, '[recipe]\nname="x"\n[nodes.a]\ntype="const"\n[nodes.b]\ntype="want_images"\nimages="@a"\n'),
             "port type mismatch")
    assert p.node == "b" and p.key == "images" and p.line == 7 and "'text'" in p.message and "'images'" in p.message


def test_set_override_errors_and_values(registry):
    text = '[recipe]\nname="x"\n[nodes.a]\ntype="const"\nrepeat=1\n'
    checked, problems = check_text(text, registry, Path("/r/x.toml"), ["nodes.a.repeat=3"])
    assert problems == [] and checked.nodes["a"].params["repeat"] == 3
    problems = problems_of(registry, text, overrides=["nodes.zz.repeat=3", "bogus"])
    assert any("no node 'zz'" in p.message for p in problems)
    assert any("expected KEY=VALUE" in p.message for p in problems)


def test_links_escape_and_vars(registry):
    text = '[recipe]\nname="x"\n[vars]\nn=3\nw="hey"\n[nodes.a]\ntype="const"\nvalue="@@${w}"\nrepeat="${n}"\n'
    checked, problems = check_text(text, registry, Path("/r/x.toml"))
    assert problems == []
    assert checked.nodes["a"].params == {"value": "@hey", "repeat": 3, "scale": 0.5, "mode": "a"}


def test_paths_are_relative_to_recipe(registry, tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    checked, problems = check_text('[recipe]\nname="x"\n[nodes.a]\ntype="read_file"\npath="data.txt"\n',
                                   registry, tmp_path / "r.toml")
    assert problems == [] and checked.nodes["a"].params["path"] == str((tmp_path / "data.txt").resolve())


def test_secret_must_be_env_reference():
    @node("needs_token")
    def needs_token(token: Annotated[str | None, Secret()] = None) -> Text:
        """Uses a token."""
        return Text("ok")

    class Plug:
        @hookimpl
        def register_node_types(self, register):
            register(needs_token)

    reg = Registry.load(extra=[Plug()], entry_points=False)
    p = find(problems_of(reg, '[recipe]\nname="x"\n[nodes.a]\ntype="needs_token"\ntoken="hf_abcdef"\n'),
             "a secret must not be written in the recipe")
    assert p.key == "token" and "$VAR_NAME" in p.hint
    checked, problems = check_text('[recipe]\nname="x"\n[nodes.a]\ntype="needs_token"\ntoken="$MY_TOKEN"\n',
                                   reg, Path("/r/x.toml"))
    assert problems == [] and checked.nodes["a"].secrets == {"token": "MY_TOKEN"}


class ListNodes:
    """A node type with a list[text] input and one without outputs, beside the text nodes."""

    @staticmethod
    @node("count_items")
    def count_items(items: list[Text]) -> Text:
        """Counts its texts."""
        return Text(str(len(items)))

    @staticmethod
    @node("sink")
    def sink(text: Text) -> None:
        """Takes a text, gives nothing."""

    @hookimpl
    def register_node_types(self, register):
        register(self.count_items)
        register(self.sink)


@pytest.fixture(scope="module")
def list_registry():
    return Registry.load(extra=[textnodes, ListNodes()], entry_points=False)


HEAD = '[recipe]\nname="x"\n[nodes.a]\ntype="const"\n'


def test_links_resolve_to_the_node_the_port_and_whether_one_value_feeds_a_list(list_registry):
    text = HEAD + ('[nodes.b]\ntype="concat"\nleft="@a"\nright="@a.output"\n'
                   '[nodes.c]\ntype="count_items"\nitems="@a"\n')
    checked, problems = check_text(text, list_registry, Path("/r/x.toml"))
    assert problems == []
    assert checked.nodes["b"].links == {"left": Link("a", "output", False), "right": Link("a", "output", False)}
    assert checked.nodes["c"].links == {"items": Link("a", "output", True)}, "one text feeds list[text] as a list"


def test_a_swept_node_links_as_the_list_its_cells_join_into(list_registry):
    text = HEAD + ('[nodes.a.sweep]\nvalue=["p", "q"]\n'
                   '[nodes.c]\ntype="count_items"\nitems="@a"\n[nodes.b]\ntype="concat"\nleft="@a"\n')
    p = find(problems_of(list_registry, text), "port type mismatch")
    assert (p.node, p.key) == ("b", "left") and "@a is 'list[text]" in p.message
    text = HEAD + '[nodes.a.sweep]\nvalue=["p", "q"]\n[nodes.c]\ntype="count_items"\nitems="@a"\n'
    checked, problems = check_text(text, list_registry, Path("/r/x.toml"))
    assert problems == [] and checked.nodes["c"].links == {"items": Link("a", "output", False)}


def test_link_problems_name_node_key_and_what_fits(list_registry):
    text = HEAD + ('[nodes.s]\ntype="sink"\ntext="@a"\n[nodes.b]\ntype="concat"\nleft="@s"\n'
                   '[nodes.c]\ntype="concat"\nleft="@nowhere"\n[nodes.d]\ntype="concat"\nleft=["@a", "@a"]\n'
                   '[nodes.e]\ntype="concat"\nleft="@ab"\n')
    problems = problems_of(list_registry, text)
    p = find(problems, "node 's' (type 'sink') has no outputs to link")
    assert (p.node, p.key) == ("b", "left")
    p = find(problems, "link to missing node 'nowhere'")
    assert (p.node, p.key) == ("c", "left") and p.hint.startswith("nodes: a, s, b, c, d, e")
    p = find(problems, "link to missing node 'ab'")
    assert p.hint.startswith("did you mean") and "'a'" in p.hint.split(";")[0]
    p = find(problems, "a list of links is not allowed here")
    assert (p.node, p.key, p.hint) == ("d", "left", "expected a link to a node's 'text' output")


def test_hints_say_what_is_allowed_and_how_to_write_it(registry):
    problems = problems_of(registry, HEAD + 'valeu="x"\n[nodes.b]\ntype="concat"\nleft="text"\nsep="@a"\n')
    assert find(problems, "unknown parameter 'valeu'").hint == \
        "did you mean 'value' or 'scale'?; allowed: value, repeat, scale, mode"
    assert find(problems, "expected a link, got the literal").hint == \
        "expected a link to a node's 'text' output; write \"@<node id>\" to link a node's output"
    assert find(problems, "where a literal belongs").hint == "expected a string; write '@@…' for a string starting with '@'"


class Required:
    """Required parameters: a literal one, an input, and an input that also takes a literal."""

    @staticmethod
    @node("needs")
    def needs(n: int, text: Text, words: Text | str) -> Text:
        """Needs all three."""
        return Text(text * n + words)

    @hookimpl
    def register_node_types(self, register):
        register(self.needs)


def test_a_missing_required_value_is_called_a_parameter_or_an_input():
    reg = Registry.load(extra=[textnodes, Required()], entry_points=False)
    problems = problems_of(reg, '[recipe]\nname="x"\n[nodes.a]\ntype="needs"\n')
    assert sorted(p.message for p in problems) == ["missing required input 'text'", "missing required parameter 'n'",
                                                  "missing required parameter 'words'"]


def test_port_type_mismatch_says_what_the_input_takes(list_registry):
    text = HEAD + '[nodes.c]\ntype="count_items"\nitems="@a"\n[nodes.b]\ntype="concat"\nleft="@c"\n'
    checked, problems = check_text(text, list_registry, Path("/r/x.toml"))
    assert problems == []  # text -> list[text] is fine; the reverse is not:
    text = HEAD + '[nodes.a.sweep]\nvalue=["p"]\n[nodes.b]\ntype="concat"\nleft="@a"\n'
    p = find(problems_of(list_registry, text), "port type mismatch")
    assert p.message.endswith("but 'left' takes 'text'") and p.hint == "link a node whose output is 'text'"


class FileNodes:
    """File parameters that may name something other than a local file."""

    @staticmethod
    @node("maybe_file")
    def maybe_file(path: Annotated[str, InputFile(must_exist=False)] = "x",
                   hub: Annotated[str, InputFile(optional_prefixes=("hf:",))] = "hf:a/b") -> Text:
        """Reads a file when there is one."""
        return Text(path)

    @hookimpl
    def register_node_types(self, register):
        register(self.maybe_file)


def test_a_file_parameter_passes_what_names_no_local_file_and_resolves_what_does(tmp_path):
    reg = Registry.load(extra=[FileNodes()], entry_points=False)
    (tmp_path / "here.txt").write_text("x")
    checked, problems = check_text('[recipe]\nname="x"\n[nodes.a]\ntype="maybe_file"\npath="elsewhere"\n'
                                   'hub="hf:org/repo"\n[nodes.b]\ntype="maybe_file"\npath="here.txt"\n'
                                   'hub="here.txt"\n', reg, tmp_path / "r.toml")
    assert problems == []
    assert checked.nodes["a"].params == {"path": "elsewhere", "hub": "hf:org/repo"} and checked.nodes["a"].files == {}
    here = (tmp_path / "here.txt").resolve()
    assert checked.nodes["b"].params == {"path": str(here), "hub": str(here)}
    assert checked.nodes["b"].files == {"path": here, "hub": here}
    p = find(problems_of(reg, '[recipe]\nname="x"\n[nodes.a]\ntype="maybe_file"\nhub="org/repo"\n',
                         path=tmp_path / "r.toml"), "file not found: org/repo")
    assert (p.node, p.key, p.hint) == ("a", "hub", "paths are relative to the recipe file")


def test_an_unreadable_file_is_a_problem(registry, tmp_path, monkeypatch):
    (tmp_path / "locked.txt").write_text("x")
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).endswith("locked.txt") else real(path, mode))
    p = find(problems_of(registry, '[recipe]\nname="x"\n[nodes.b]\ntype="read_file"\npath="locked.txt"\n',
                         path=tmp_path / "r.toml"), "not readable")
    assert (p.message, p.node, p.key, p.hint) == ("file is not readable: locked.txt", "b", "path", "check its permissions")


def test_file_problems_name_node_and_key(registry, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    locked = tmp_path / "locked.txt"
    locked.write_text("x")
    locked.chmod(0)
    text = ('[recipe]\nname="x"\n[nodes.a]\ntype="read_file"\npath="pipe"\n'
            '[nodes.b]\ntype="read_file"\npath="locked.txt"\n[nodes.c]\ntype="read_file"\npath="bad\\u0000name"\n')
    try:
        problems = problems_of(registry, text, path=tmp_path / "r.toml")
    finally:
        locked.chmod(0o600)
    by_node = {p.node: p for p in problems}
    root = os.geteuid() == 0  # root reads every file
    assert set(by_node) == ({"a", "c"} if root else {"a", "b", "c"}) and all(p.key == "path" for p in problems)
    assert "not a regular file" in by_node["a"].message
    if not root:
        assert by_node["b"].message == "file is not readable: locked.txt" and by_node["b"].hint == "check its permissions"
    assert by_node["c"].message.startswith("invalid path 'bad")
